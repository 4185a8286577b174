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

Which attention a CPU trains with (`written_out`): the written-out one below whenever attention dropout is on, and in
bf16 without dropout up to a length that depends on the CPU kind (SDPA's fused bf16 backward is the slow one below
it). Measured, one layer's forward + backward at 12 heads, torch 2.13 (`benchmarks/attention_cpu.py`):
  Intel Xeon with AMX (2 cores): SDPA 3-6x slower below about 200 tokens (40 ms against 7 at 16 tokens), about even
      at 192, faster from 224 on;
  AMD EPYC with AVX512-BF16, no AMX (2 cores): SDPA 1.1-4x slower up to 320 tokens, about even at 384-512.
A table, not a probe at run time: on a shared 2-core VM the same comparison swung between 0.98x and 1.46x from one
run to the next, so a probe would pick differently in different processes, and the two paths round differently
in bf16: a resumed run would no longer reproduce the uninterrupted one. Both paths compute the same function
(tests/test_dropout.py), so the table decides speed only. In fp32 SDPA is faster at every length.
"""
from __future__ import annotations

import functools
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


WRITTEN_OUT_UP_TO = {"amx": 192, "avx512_bf16": 320, "other": 192}  # tokens, by CPU kind (see above)


def fast_path(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def cpu_kind() -> str:
    """'amx' (Intel Sapphire Rapids and later), 'avx512_bf16' (AMD Zen 4/5, Cooper Lake) or 'other'."""
    has = lambda name: bool(getattr(torch.cpu, name, lambda: False)())
    return "amx" if has("_is_amx_tile_supported") else "avx512_bf16" if has("_is_avx512_bf16_supported") else "other"


@functools.cache
def written_out_limit() -> int:
    """Up to how many tokens bf16 training without attention dropout takes the written-out attention on this CPU."""
    return WRITTEN_OUT_UP_TO[cpu_kind()]


def written_out(q: torch.Tensor, p: float, training: bool) -> bool:
    """Whether attention on q (B, heads, L, d) with dropout rate p takes `attention` below rather than SDPA: on CPU,
    with dropout (SDPA's is the serial one on its unfused path) or in bf16 training up to this CPU's limit."""
    return fast_path(q) and (p > 0 or (training and q.dtype == torch.bfloat16 and q.shape[2] <= written_out_limit()))


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
