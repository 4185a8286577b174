"""The varlen layout (bge/packing.py): packing on the host, static shapes, and the encoder on it against the padded
path (outputs and gradients on real tokens), on CPU where its attention is the padded view."""
import random

import pytest
import torch
import torch.nn.functional as F

from bge import packing
from bge.model import Encoder, ModelConfig
from bge.packing import pack, padding_sequences
from bge.step import forward_backward, make_embed


def texts(rng: random.Random, n: int, lo: int = 2, hi: int = 30) -> list[list[int]]:
    return [[101] + [rng.randrange(1000, 2000) for _ in range(rng.randint(lo, hi) - 2)] + [102] for _ in range(n)]


def test_pack_lays_texts_back_to_back():
    b = pack([[1, 5, 2], [1, 2], [1, 7, 8, 9, 2]], pad_id=0)
    assert b.input_ids.tolist() == [1, 5, 2, 1, 2, 1, 7, 8, 9, 2]
    assert b.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert b.sequence.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 10] and b.cu_seqlens.dtype == torch.int32
    assert (b.max_len, b.count) == (5, 3)


@pytest.mark.parametrize("multiple,max_length", [(64, 30), (256, 30), (1000, 40), (16, 4)])
def test_buckets_have_one_shape_and_short_non_empty_padding_sequences(multiple, max_length):
    rng = random.Random(multiple)
    k = padding_sequences(multiple, max_length)
    shapes = set()
    for n in range(1, 40):
        ids = texts(rng, 7, hi=min(30, max_length))
        b = pack(ids, pad_id=0, multiple=multiple, max_length=max_length)
        real = sum(len(x) for x in ids)
        lengths = (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).tolist()
        assert len(b.input_ids) % multiple == 0 and len(b.input_ids) - real < multiple + k
        assert len(lengths) == 7 + k and b.max_len == max_length and b.count == 7
        assert lengths[:7] == [len(x) for x in ids]
        assert all(1 <= L <= min(packing.PADDING_SEQUENCE, max_length) for L in lengths[7:])
        assert b.input_ids[real:].eq(0).all() and b.sequence[real:].ge(7).all()
        shapes.add((len(b.input_ids), len(b.cu_seqlens)))
    assert len({c for _, c in shapes}) == 1  # the offsets' shape never changes; the token count moves by buckets
    with pytest.raises(ValueError, match="max_length 5"):
        pack([[1] * 6], pad_id=0, multiple=16, max_length=5)


def model_and_batch(flavour="bert", pooling="cls", dtype=torch.float32):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=2100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_positions=80, hidden_dropout=0.0, attention_dropout=0.0, flavour=flavour, pooling=pooling,
                      pad_token_id=1 if flavour == "xlm-roberta" else 0)
    model = Encoder(cfg).to(dtype).train()
    ids = texts(random.Random(1), 9)
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [cfg.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return model, ids, input_ids, mask


def grads_of(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    fn().pow(2).sum(0)[:5].sum().backward()  # a loss that reaches every text and some dimensions
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flavour,pooling", [("bert", "cls"), ("bert", "mean"), ("xlm-roberta", "mean")])
@pytest.mark.parametrize("multiple", [0, 64])
def test_varlen_equals_padded_on_real_tokens_forward_and_gradients(flavour, pooling, multiple):
    model, ids, input_ids, mask = model_and_batch(flavour, pooling, torch.float64)
    pad_id = model.cfg.pad_token_id
    batch = pack(ids, pad_id=pad_id, multiple=multiple, max_length=30)
    real = mask.bool()
    states = model.forward_varlen(batch)
    assert len(states) == len(batch.input_ids)
    assert torch.allclose(states[: real.sum()], model(input_ids, mask)[real], atol=1e-12)
    ref = grads_of(model, lambda: model.embed(input_ids, mask))
    got = grads_of(model, lambda: model.embed(batch))
    assert set(got) == set(ref)
    assert max((got[n] - ref[n]).abs().max().item() for n in ref) <= 1e-12
    assert max(g.abs().max().item() for g in ref.values()) > 1e-6  # not trivially zero


def test_padding_to_a_bucket_changes_nothing_in_fp32():
    model, ids, _, _ = model_and_batch()
    exact = grads_of(model, lambda: model.embed(pack(ids, pad_id=0)))
    for multiple in (16, 128):
        padded = grads_of(model, lambda: model.embed(pack(ids, pad_id=0, multiple=multiple, max_length=30)))
        assert max((padded[n] - exact[n]).abs().max().item() for n in exact) <= 1e-6


def test_flash_varlen_applies_only_on_cuda_in_half_precision_without_dropout(monkeypatch):
    monkeypatch.setattr(packing, "varlen_attn", lambda *a: None)  # present, whatever this torch build has
    assert packing.flash_applies(torch.bfloat16, 0.0, cuda=True)
    assert packing.flash_applies(torch.float16, 0.0, cuda=True)
    assert not packing.flash_applies(torch.bfloat16, 0.1, cuda=True)  # the kernel has no dropout
    assert not packing.flash_applies(torch.float32, 0.0, cuda=True)
    assert not packing.flash_applies(torch.bfloat16, 0.0, cuda=False)
    monkeypatch.setattr(packing, "varlen_attn", None)  # an older torch
    assert not packing.flash_applies(torch.bfloat16, 0.0, cuda=True)


def test_the_encoder_hands_flash_the_offsets_and_otherwise_takes_the_padded_view(monkeypatch):
    # the CUDA dispatch, on CPU: where flash applies the encoder calls varlen_attn with the batch's offsets (its
    # answer, here the values, is what the layer gets); where it does not, the padded view gives the exact result
    model, ids, _, _ = model_and_batch()
    model.eval()
    batch = pack(ids, pad_id=0, multiple=32, max_length=30)
    calls = []

    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        calls.append((cu_q is batch.cu_seqlens, cu_k is batch.cu_seqlens, max_q, max_k, tuple(q.shape)))
        return v

    monkeypatch.setattr(packing, "varlen_attn", fake_varlen)
    qkv = torch.randn(len(batch.input_ids), 3 * model.cfg.hidden_size, dtype=torch.float64)
    exact = model._attend_varlen(qkv, batch)  # on CPU flash never applies
    assert calls == []
    monkeypatch.setattr(packing, "flash_applies", lambda dtype, p, cuda: True)
    values = model._attend_varlen(qkv, batch)
    heads = model.cfg.num_heads
    assert calls == [(True, True, 30, 30, (len(batch.input_ids), heads, model.cfg.hidden_size // heads))]
    assert torch.equal(values, qkv[:, 2 * model.cfg.hidden_size:])
    assert not torch.allclose(exact, values)


def test_one_forward_for_all_groups_gives_the_same_step():
    # the varlen step embeds queries and passages together; without dropout that is the two-forward step
    model, ids, _, _ = model_and_batch()
    embed = make_embed(model.embed, None, torch.device("cpu"), pack=lambda x: pack(x, pad_id=0, multiple=32, max_length=30))
    inputs = {"q": ids[:4], "p": ids[4:8]}
    loss_fn = lambda e: ((e["q"] @ e["p"].T).logsumexp(1).mean(), {})
    results = []
    for together in (False, True):
        model.zero_grad()
        loss, _ = forward_backward(embed, inputs, loss_fn, together=together)
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6) and max((g0[n] - g1[n]).abs().max().item() for n in g0) <= 1e-6


def test_bf16_autocast_varlen_runs_and_tracks_fp32():
    model, ids, input_ids, mask = model_and_batch()
    ref = model.embed(input_ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.embed(pack(ids, pad_id=0, multiple=64, max_length=30)).float()
    assert F.cosine_similarity(got, ref, dim=-1).min() > 0.999
