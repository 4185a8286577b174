"""GradCache gives the gradients of the plain full-batch step."""
from contextlib import nullcontext

import pytest
import torch

from bge.loss import info_nce
from bge.model import Encoder, ModelConfig
from bge.step import forward_backward
from bge.tokenizer import Tokenizer


def setup(dropout: float, minilm_dir, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, hidden_dropout=dropout,
                      attention_dropout=dropout)
    model = Encoder(cfg).train().to(dtype)
    tok = Tokenizer.from_folder(minilm_dir, position_limit=512)
    queries = [f"question number {i} about {'brakes ' * (i % 4)}chains" for i in range(13)]
    passages = [f"passage {i} " + "text " * (3 + 5 * (i % 7)) for i in range(26)]
    inputs = {"q": tok.tokenize(queries), "p": tok.tokenize(passages)}

    def embed(ids):
        input_ids, mask = tok.pad(ids)
        return model.embed(input_ids, mask)

    def loss_fn(emb):
        loss, acc = info_nce(emb["q"], emb["p"], torch.arange(13) * 2, 0.05)
        return loss, {"acc": acc}

    return model, embed, inputs, loss_fn


def grads(model, embed, inputs, loss_fn, chunk, seed=1, **kw):
    model.zero_grad()
    torch.manual_seed(seed)
    loss, _ = forward_backward(embed, inputs, loss_fn, chunk_size=chunk, **kw)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 4, 5, 100])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-14)])
def test_gradcache_equals_full_batch_gradients(minilm_dir, chunk, dtype, tol):
    # fp32: within rounding (chunks pad to other widths, so sums run in another order); fp64: exact
    model, embed, inputs, loss_fn = setup(0.0, minilm_dir, dtype)
    full_loss, full = grads(model, embed, inputs, loss_fn, 0)
    loss, cached = grads(model, embed, inputs, loss_fn, chunk)
    assert torch.allclose(loss, full_loss, atol=tol)
    assert max((cached[n] - full[n]).abs().max().item() for n in full) <= tol
    assert max(g.abs().max().item() for g in full.values()) > 1e-4  # the gradients are not trivially zero


@pytest.mark.parametrize("chunk", [0, 4])
def test_loss_scale_scales_the_gradients_and_not_the_loss(minilm_dir, chunk):
    """fp16's GradScaler and gradient accumulation pass loss_scale: the backward sees loss * scale on both paths."""
    model, embed, inputs, loss_fn = setup(0.0, minilm_dir, torch.float64)
    loss1, g1 = grads(model, embed, inputs, loss_fn, chunk)
    loss8, g8 = grads(model, embed, inputs, loss_fn, chunk, loss_scale=8.0)
    assert torch.equal(loss1, loss8)
    assert max((g8[n] - 8 * g1[n]).abs().max().item() for n in g1) <= 1e-12


def test_dropout_is_replayed_in_the_second_forward(minilm_dir):
    # a single chunk consumes the RNG exactly as the one-forward (DDP-style) plain step does, so even with
    # dropout the two agree; if the re-forward drew fresh dropout masks, the gradients would not match the loss
    model, embed, inputs, loss_fn = setup(0.1, minilm_dir)
    full_loss, full = grads(model, embed, inputs, loss_fn, 0, no_sync=nullcontext)
    loss, cached = grads(model, embed, inputs, loss_fn, 100)
    assert torch.allclose(loss, full_loss, atol=1e-6)
    assert max((cached[n] - full[n]).abs().max().item() for n in full) <= 1e-5
    _, other_seed = grads(model, embed, inputs, loss_fn, 0, seed=2)
    assert max((other_seed[n] - full[n]).abs().max().item() for n in full) > 1e-4  # dropout really is on


def test_non_finite_loss_leaves_no_gradient(minilm_dir):
    model, embed, inputs, _ = setup(0.0, minilm_dir)
    for chunk in (0, 4):
        model.zero_grad(set_to_none=True)
        loss, _ = forward_backward(embed, inputs, lambda e: (e["q"].sum() * float("nan"), {}), chunk_size=chunk)
        assert torch.isnan(loss) and all(p.grad is None for p in model.parameters())
