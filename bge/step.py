"""One micro-batch's forward and backward, plain or with GradCache.

A contrastive loss is a function of embeddings only, so a step is: embed every group of texts (queries,
passages, ...), compute the loss on the embeddings, backpropagate. GradCache (Gao et al., 2021) splits the
middle so a batch of thousands of texts fits in memory with the full batch's gradient:
  1. embed every chunk without autograd (remembering each chunk's RNG state, so dropout can be replayed);
  2. compute the loss on those embeddings as leaves, and backpropagate into them only;
  3. re-embed each chunk with autograd (same RNG state) and backpropagate the cached embedding gradient.
Peak memory is one chunk's activations plus the embeddings, whatever the batch size.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Callable

import torch

from bge.loss import LossFn
from bge.packing import Packed

Embed = Callable[[list[list[int]]], torch.Tensor]  # token id lists -> (n, d) float32 embeddings


def make_embed(fn: Callable, pad: Callable, device: torch.device, *, amp_dtype: torch.dtype | None = None,
               compile: bool = False, compile_mode: str = "default", packed: bool = False,
               pack: Callable[[list[list[int]]], Packed] | None = None) -> Embed:
    """The function a step embeds texts with: pad the token ids (per call, so per GradCache chunk), run
    fn(input_ids, mask, packed=...) (model.embed, or its DDP wrapper) under autocast (bf16/fp16) or in fp32,
    and return float32 embeddings. With `pack` (bge.packing.pack, its pad id and bucket bound) the ids are packed
    on the host instead and fn gets the Packed batch: the varlen layout. compile_mode is torch.compile's mode:
    "reduce-overhead" replays CUDA graphs (one per input shape), which removes the per-kernel launch cost; the
    caller then marks each step's start with torch.compiler.cudagraph_mark_step_begin()."""
    # compiles a view: the raw module is what we save
    fn = torch.compile(fn, dynamic=True, mode=compile_mode) if compile else fn

    def embed(ids: list[list[int]]) -> torch.Tensor:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if pack is not None:
                return fn(pack(ids).to(device)).float()
            input_ids, mask = pad(ids)
            return fn(input_ids.to(device), mask.to(device), packed=packed).float()

    return embed


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


@contextmanager
def _replay(state: tuple, device: torch.device):
    """Run the body with the RNG as it was in `state`, then put the current RNG back."""
    now = _rng_state(device)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
    try:
        yield
    finally:
        torch.set_rng_state(now[0])
        if now[1] is not None:
            torch.cuda.set_rng_state(now[1], device)


def forward_backward(embed: Embed, inputs: dict[str, list[list[int]]], loss_fn: LossFn, *, chunk_size: int = 0,
                     loss_scale: float = 1.0, device: torch.device = torch.device("cpu"),
                     no_sync: Callable[[], AbstractContextManager] | None = None, sync: bool = True,
                     together: bool = False, skip_nonfinite: bool = True,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Embed each group of `inputs`, apply loss_fn to the embeddings, and backpropagate loss * loss_scale
    into the model. chunk_size > 0 uses GradCache with chunks of that many texts. Returns the (unscaled,
    detached) loss and loss_fn's statistics.

    Under DDP pass its `no_sync`: then every forward is followed by its own backward (all groups go through
    one forward), and only the last backward syncs gradients, or none when sync=False (gradient accumulation).
    together=True embeds all groups in one forward (the varlen layout has no padding to share, and one forward
    launches half the kernels of two).

    A non-finite loss is not backpropagated, except under DDP, where every rank must run the same collectives, or
    with skip_nonfinite=False, which spares the host from reading the loss back (the caller then skips the optimiser
    step itself, on all ranks together: bge.optim.step_if)."""
    names = list(inputs)
    sizes = [len(inputs[n]) for n in names]
    quiet = no_sync or nullcontext  # the context for backward passes that must not all-reduce yet
    backprop = lambda loss: no_sync is not None or not skip_nonfinite or bool(torch.isfinite(loss))

    if chunk_size <= 0:
        with nullcontext() if sync else quiet():
            if no_sync is None and not together:  # one forward per group: each pads to its own longest text
                emb = {name: embed(ids) for name, ids in inputs.items()}
            else:  # DDP wants one forward per backward; varlen has no padding to share
                emb = dict(zip(names, embed([x for n in names for x in inputs[n]]).split(sizes)))
            loss, stats = loss_fn(emb)
            if backprop(loss):
                (loss * loss_scale).backward()
        return loss.detach(), stats

    texts = [x for n in names for x in inputs[n]]  # chunks may straddle groups: the loss sees whole groups
    chunks = [texts[i : i + chunk_size] for i in range(0, len(texts), chunk_size)]
    states = []
    with torch.no_grad():
        parts = []
        for part in chunks:
            states.append(_rng_state(device))
            parts.append(embed(part))
        cached = torch.cat(parts).requires_grad_()
    loss, stats = loss_fn(dict(zip(names, cached.split(sizes))))
    if not backprop(loss):
        return loss.detach(), stats
    (loss * loss_scale).backward()  # into the cached embeddings only: no parameter is touched yet
    for i, (part, grad) in enumerate(zip(chunks, cached.grad.split(chunk_size))):
        last = sync and i == len(chunks) - 1
        with _replay(states[i], device), nullcontext() if last else quiet():
            embed(part).backward(grad)
    return loss.detach(), stats
