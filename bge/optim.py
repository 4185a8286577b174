"""AdamW with BERT's weight-decay exclusions, and the learning-rate schedule as one pure function."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from bge.errors import UserError

# BGE's recipe: a smaller model takes a larger step.
DEFAULT_LR_BY_HIDDEN = ((512, 3e-5), (768, 2e-5), (10**9, 1e-5))  # hidden size up to -> lr (small/base/large)
DEFAULT_LR_BILSTM = 1e-3  # a mostly freshly initialised recurrent model, not a pretrained transformer


def default_lr(hidden_size: int, arch: str = "bert") -> float:
    """3e-5 for small models (hidden <= 512), 2e-5 for base (768), 1e-5 for large (1024); 1e-3 for the BiLSTM."""
    if arch == "bilstm":
        return DEFAULT_LR_BILSTM
    return next(lr for limit, lr in DEFAULT_LR_BY_HIDDEN if hidden_size <= limit)


def freeze(model: nn.Module, *, embeddings: bool = False, layers: int = 0) -> int:
    """Stop training the embeddings (`model.emb`) and/or the first `layers` of `model.layers` (transformer or
    LSTM layers); returns how many parameters were frozen. The optimiser then skips them (param_groups)."""
    if not 0 <= layers <= len(model.layers):
        raise UserError(f"--freeze-layers {layers}: the model has {len(model.layers)} layers")
    frozen = [*(model.emb.parameters() if embeddings else ()), *model.layers[:layers].parameters()]
    for p in frozen:
        p.requires_grad_(False)
    return sum(p.numel() for p in frozen)


def get_lr(step: int, *, lr: float, warmup_steps: int, total_steps: int, schedule: str = "linear",
           min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then linear or cosine decay to min_lr_ratio * lr at
    total_steps (or constant). `step` counts optimiser steps from 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {schedule!r} (linear, cosine, constant)")
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * decay)


def decayed(model: nn.Module) -> list[nn.Parameter]:
    """The trainable matrices (and embedding tables): what weight decay and the L1 penalty apply to. Biases, LayerNorm
    and other 1-d parameters are left alone (BERT's exclusions)."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]


def param_groups(model: nn.Module, weight_decay: float, lr_scale: float = 1.0, layer_decay: float = 1.0) -> list[dict]:
    """Decay the matrices, not the rest (see `decayed`). `lr_scale` multiplies the schedule's rate for this module.

    `layer_decay` < 1 is layer-wise learning-rate decay (ELECTRA's and BEiT's fine-tuning recipe): the top layer and
    anything above it (a pooling head) train at `lr_scale`, each layer below at `layer_decay` times the rate of the one
    above, the embeddings (`model.emb`) lowest, on the view that the lower layers hold the general features a small
    domain set should move least. Two groups (decayed, not) per depth, from the top down; at 1, just the two."""
    decay_ids = {id(p) for p in decayed(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def two(params: list[nn.Parameter], scale: float) -> list[dict]:
        return [{"params": [p for p in params if id(p) in decay_ids], "weight_decay": weight_decay, "lr_scale": scale},
                {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0, "lr_scale": scale}]

    if layer_decay == 1.0:
        return two(trainable, lr_scale)
    top = len(model.layers)  # the top layer's depth, and that of anything above it: the rate in full
    depth = {id(p): 0 for p in model.emb.parameters()}
    depth.update({id(p): i + 1 for i, layer in enumerate(model.layers) for p in layer.parameters()})
    at: dict[int, list[nn.Parameter]] = {}
    for p in trainable:
        at.setdefault(depth.get(id(p), top), []).append(p)
    return [g for d in sorted(at, reverse=True) for g in two(at[d], lr_scale * layer_decay ** (top - d))]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, fused: bool = True, extra: list[dict] = (),
                   layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (and the `extra` parameter groups, e.g. a head with its own lr_scale);
    the fused kernel (one launch for all tensors) where torch has it."""
    groups = param_groups(model, weight_decay, layer_decay=layer_decay) + list(extra)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def step_if(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """optimizer.step() where the 0-d bool tensor `ok` is True, and no change at all where it is False (parameters,
    moments and step count stay as they were), decided on the device: the host never waits to find out. Fused AdamW
    reads `found_inf` for this, the attribute through which torch's GradScaler skips its steps."""
    optimizer.found_inf = (~ok).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
