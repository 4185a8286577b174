"""The cheap CPU dropout: its rate, its expectation, its reproducibility, and the attention that uses it against
a naive computation with the same mask."""
import pytest
import torch
import torch.nn.functional as F

import bge.dropout
import bge.model
from bge.dropout import WRITTEN_OUT_UP_TO, Dropout, attention, cpu_kind, dropout, keep_mask, written_out
from bge.model import Encoder, ModelConfig


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_keep_rate_is_one_minus_p_in_every_lane(p):
    torch.manual_seed(0)
    keep, scale = keep_mask((400_000, 4), p, torch.device("cpu"))
    assert keep.dtype == torch.bool
    # each column is one 16-bit lane of the 64-bit draws; a biased lane (random_() without the full range leaves
    # the top bit 0) would keep everything there
    rate = keep.float().mean(0)
    assert torch.allclose(rate, torch.full((4,), 1 - p), atol=4e-3), rate
    assert scale == pytest.approx(1 / (1 - round(p * 65536) / 65536))
    assert abs(scale - 1 / (1 - p)) < 1e-4


def test_dropout_is_unbiased_zeroes_and_scales():
    torch.manual_seed(0)
    x = torch.ones(1_000_000)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert torch.allclose(y[kept], torch.full_like(y[kept], 65536 / (65536 - 6554)))
    assert abs(kept.float().mean().item() - 0.9) < 2e-3
    assert abs(y.mean().item() - 1.0) < 3e-3
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0, training=True) is x


def test_dropout_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 48, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, torch.where(kept, g, 0) * (65536 / (65536 - round(0.3 * 65536))))


def test_masks_follow_torchs_generator():
    m = Dropout(0.2).train()
    x = torch.randn(8, 16, 32)
    torch.manual_seed(5)
    a = m(x)
    torch.manual_seed(5)
    b = m(x)
    c = m(x)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert torch.equal(m.eval()(x), x)


def naive_attention(q, k, v, key_mask, keep, scale):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s.masked_fill(~key_mask, float("-inf"))
    return (torch.softmax(s, -1) * keep.view(s.shape) * scale) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_dropout_equals_naive_with_the_same_mask(dtype):
    B, h, L, d, p = 3, 2, 7, 4, 0.25
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, h, L, d, dtype=torch.float64) for _ in range(3))
    key_mask = (torch.arange(L) < torch.tensor([7, 4, 1])[:, None])[:, None, None, :]
    g = torch.randn(B, h, L, d, dtype=torch.float64)

    torch.manual_seed(3)
    keep, scale = keep_mask((B * h, L, L), p, torch.device("cpu"))
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_in, key_mask, keep, scale)
    ref.backward(g)

    torch.manual_seed(3)  # the same draws: the same mask
    ours_in = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ours = attention(*ours_in, key_mask, p)
    ours.backward(g.to(dtype))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(ours.double(), ref, **tol)
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad.double(), b.grad, **tol)
    assert not torch.equal(keep, torch.ones_like(keep))  # the test drops something


def test_attention_without_drops_equals_sdpa():
    # p = 0 through the same code (threshold 0 keeps every element, scale 1): the rest of the computation is SDPA's
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    key_mask = (torch.arange(6) < torch.tensor([6, 3])[:, None])[:, None, None, :]
    torch.testing.assert_close(attention(q, k, v, key_mask, 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask), atol=1e-6, rtol=1e-5)


def test_encoder_training_step_drops_at_the_configured_rates():
    # the encoder routes hidden and attention dropout through the cheap mask on CPU: a train-mode forward is
    # reproducible under the seed, differs from eval mode, and p = 0 makes train mode equal eval mode
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_positions=20,
                      hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    model = Encoder(cfg)
    ids = torch.randint(1, 50, (4, 9))
    mask = (torch.arange(9) < torch.tensor([9, 5, 2, 7])[:, None]).long()
    model.train()
    torch.manual_seed(7)
    a = model.embed(ids, mask)
    torch.manual_seed(7)
    b = model.embed(ids, mask)
    assert torch.equal(a, b)
    model.eval()
    e = model.embed(ids, mask)
    assert not torch.allclose(a, e, atol=1e-4)
    model.set_dropout(hidden=0.0, attention=0.0)
    model.train()
    torch.testing.assert_close(model.embed(ids, mask), e, atol=1e-6, rtol=1e-5)


def test_bf16_training_without_attention_dropout_matches_eval():
    # in bf16 training at p = 0 the encoder takes the written-out attention (SDPA's bf16 backward is slow on CPU);
    # eval takes SDPA: the two must compute the same function, to bf16 rounding
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=40,
                      hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = Encoder(cfg)
    for layer in model.layers:  # BERT's N(0, 0.02) leaves attention a small share of each layer's output
        torch.nn.init.normal_(layer.qkv.weight, std=0.5)
        torch.nn.init.normal_(layer.out.weight, std=0.5)
    ids = torch.randint(1, 50, (4, 30))
    mask = (torch.arange(30) < torch.tensor([30, 12, 2, 25])[:, None]).long()
    real = mask.bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = model.eval()(ids, mask)[real].float()
        t = model.train()(ids, mask)[real].float()
    assert F.cosine_similarity(e, t, dim=-1).min() > 0.999


def test_the_cpu_kinds_limit_decides_and_either_attention_trains_the_same(monkeypatch):
    # the written-out attention's reach in bf16 training is read from a per-CPU-kind table; both paths are exact,
    # so forcing either one must give the same outputs and gradients (to bf16 rounding)
    assert cpu_kind() in WRITTEN_OUT_UP_TO and bge.dropout.written_out_limit() == WRITTEN_OUT_UP_TO[cpu_kind()]
    q = torch.zeros(2, 4, 200, 8, dtype=torch.bfloat16)
    assert written_out(q, 0.0, True) == (200 <= WRITTEN_OUT_UP_TO[cpu_kind()])
    assert written_out(q, 0.1, False) and not written_out(q, 0.0, False) and not written_out(q.float(), 0.0, True)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_positions=40,
                      hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = Encoder(cfg).train()
    for layer in model.layers:  # as above: make attention matter
        torch.nn.init.normal_(layer.qkv.weight, std=0.5)
    ids = torch.randint(1, 50, (4, 30))
    mask = (torch.arange(30) < torch.tensor([30, 12, 2, 25])[:, None]).long()
    calls = []
    monkeypatch.setattr(bge.model, "attention", lambda *a: calls.append(1) or attention(*a))
    runs = []
    for limit in (0, 10**6):  # SDPA everywhere, then written out everywhere
        monkeypatch.setattr(bge.dropout, "written_out_limit", lambda: limit)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model.embed(ids, mask).float()
        emb.pow(3).sum().backward()
        runs.append((len(calls), emb.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (n0, e0, g0), (n1, e1, g1) = runs
    assert n0 == 0 and n1 == cfg.num_layers  # forcing really switched the path
    assert F.cosine_similarity(e0, e1, dim=-1).min() > 0.999 and F.cosine_similarity(g0, g1, dim=0) > 0.99
