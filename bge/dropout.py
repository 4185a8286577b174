"""Dropout that is cheap on CPU, and the attention that uses it.

torch's CPU dropout draws one Mersenne Twister number per element (`bernoulli_`), serially. In a MiniLM
training step on 2 cores that was a third of the step: attention dropout alone draws batch x heads x L x L
numbers per layer, and it also forces scaled_dot_product_attention off its fused kernel onto the unfused
"math" path, which adds checks for fully masked rows on the same L x L tensors.

Here each 64-bit draw from the same generator gives four 16-bit uniforms, and an element is kept when its
uniform is at least round(p * 65536): the rate is p to within 1/65536 (0.1 -> 0.100006) and kept values are
scaled by 1 / (1 - that rate), so the expectation is exact. The masks come from torch's default generator,
so torch.manual_seed, the RNG state saved in checkpoints and GradCache's replay reproduce them exactly.
CUDA keeps torch's own dropout (Philox, parallel, fused into the attention kernels); so does torch.compile,
which generates its own.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 1 << 16  # each element's uniform takes one of 65536 values


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask, True with probability 1 - p (to 1/65536), and the scale that keeps the expectation."""
    n = math.prod(shape)
    threshold = round(p * LEVELS)
    # the full 64-bit range: random_() alone leaves the top bit 0, which would bias every fourth lane
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    keep = words.view(torch.int16)[:n].view(shape) >= threshold - LEVELS // 2
    return keep, LEVELS / (LEVELS - threshold)


def fast_path(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training), with the cheap mask on CPU."""
    if not training or p == 0:
        return x
    if not fast_path(x):
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return torch.where(keep, x, 0) * scale  # autograd keeps the bool mask (a byte an element) for backward


class Dropout(nn.Dropout):
    """nn.Dropout (same `p`, same state dict: none) that uses `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, p: float) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p) for (B, heads, L, d) inputs and a
    (B, 1, 1, L) boolean key mask, written out so the dropout on the probabilities uses the cheap mask. Used on
    CPU while training (bge.model says when); SDPA's fused kernels are faster for inference. No row is fully
    masked (every text keeps its [CLS]), so the plain softmax is safe."""
    B, h, L, d = q.shape
    bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~key_mask, float("-inf"))
    scores = torch.baddbmm(bias.expand(B, h, 1, L).reshape(B * h, 1, L), q.reshape(B * h, L, d),
                           k.reshape(B * h, L, d).transpose(1, 2), alpha=d**-0.5)
    probs = torch.softmax(scores, dim=-1)
    if p == 0:
        return torch.bmm(probs, v.reshape(B * h, L, d)).view(B, h, L, d)
    keep, scale = keep_mask(probs.shape, p, q.device)
    # the scale is applied to the (L x d) output rather than the (L x L) probabilities: one pass fewer
    return (torch.bmm(torch.where(keep, probs, 0), v.reshape(B * h, L, d)) * scale).view(B, h, L, d)
