"""The unpadded (varlen) layout: a micro-batch's texts back to back in one row of tokens, and attention over it.

    tokens   [CLS] a a a [SEP] [CLS] b [SEP] [CLS] c c c c [SEP] | pad pad pad | pad pad
    cu_seqlens  0                5             8                 14            17      19

Built on the host from the token id lists (`pack`), so the device never waits to learn a shape: no boolean
indexing, no nonzero(), no .item(). Every layer but attention is row-wise, so the encoder runs them on the T real
tokens alone; attention runs per text:
  CUDA, bf16/fp16, no attention dropout (`flash_applies`): torch.nn.attention.varlen.varlen_attn (FlashAttention-2
      over the cumulative offsets, `attention`);
  otherwise (attention dropout, fp32, CPU): the caller's padded view of the packed tokens (bge.model), exact, with
      scaled_dot_product_attention's dropout on CUDA and bge/dropout.py's cheap dropout on CPU. The other kernel over
      offsets, SDPA on nested jagged tensors, was measured slower: with dropout on an H200 its step was 2.1x the
      padded path's, and on CPU its per-text math path was 30x slower than the padded view (README).

Static shapes (`multiple` > 0): the token count is rounded up to a multiple of `multiple` with padding tokens that
form their own short sequences, always `padding_sequences(multiple)` of them, so a micro-batch's shapes depend only
on its bucket and its number of texts, and torch.compile's CUDA graphs record once per bucket and then replay.
Padding sequences attend only to themselves and pooling never reads them, so real tokens get the unpadded result
(with dropout on, the masks are drawn over the padded shape, so they differ from the unpadded run's: the same
distribution, not the same draws).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

try:  # torch >= 2.9
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: jagged SDPA serves every case
    varlen_attn = None

PADDING_SEQUENCE = 64  # longest padding sequence: one FlashAttention tile, so padding costs next to no attention


class Packed(NamedTuple):
    """A micro-batch in the varlen layout (see the module docstring)."""

    input_ids: torch.Tensor  # (T,) token ids, texts in order, then the padding tokens
    positions: torch.Tensor  # (T,) each token's position in its sequence (0 = [CLS])
    sequence: torch.Tensor  # (T,) which sequence each token belongs to (texts first, padding sequences after)
    cu_seqlens: torch.Tensor  # (S + 1,) int32 offsets of the S sequences
    max_len: int  # longest sequence (with `multiple`: the fixed bound, so every bucket has one value)
    count: int  # number of texts: the first `count` sequences

    def to(self, device: torch.device) -> "Packed":
        move = lambda t: t.to(device, non_blocking=True)
        return Packed(move(self.input_ids), move(self.positions), move(self.sequence), move(self.cu_seqlens),
                      self.max_len, self.count)


def padding_sequences(multiple: int, max_length: int) -> int:
    """How many padding sequences a micro-batch padded to a multiple of `multiple` carries: enough that any amount of
    padding from that many tokens up to multiple + that many - 1 splits into non-empty sequences of at most
    min(PADDING_SEQUENCE, max_length) tokens. Fixed, so the offsets tensor has one shape per bucket."""
    cap = min(PADDING_SEQUENCE, max_length)
    return max(1, -(-(multiple - 1) // (cap - 1)))


def pack(ids: list[list[int]], pad_id: int, multiple: int = 0, max_length: int = 0) -> Packed:
    """Token id lists -> the varlen layout, on the host. multiple > 0 pads the token count up to a multiple of it
    (static shapes); max_length is then the longest a text may be (the max_len every bucket reports)."""
    lengths = [len(x) for x in ids]
    longest = max(lengths)
    flat = [t for x in ids for t in x]
    max_len = longest
    if multiple > 0:
        if longest > max_length or max_length < 2:
            raise ValueError(f"pack: max_length {max_length} must be at least 2 and at least the longest text's "
                             f"length ({longest})")
        k = padding_sequences(multiple, max_length)
        total = len(flat)
        pad = -(-(total + k) // multiple) * multiple - total  # at least one token per padding sequence
        lengths = lengths + [pad // k + (i < pad % k) for i in range(k)]
        flat += [pad_id] * pad
        max_len = max_length
    n = torch.tensor(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(n, 0, out=cu[1:])
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), n)
    positions = torch.arange(len(flat)) - cu[:-1].long()[sequence]
    return Packed(torch.tensor(flat), positions, sequence, cu, max_len, len(ids))


# ---- attention over the offsets (CUDA) ----------------------------------------------------------------------
def flash_applies(dtype: torch.dtype, p: float, cuda: bool) -> bool:
    """Whether FlashAttention's varlen kernel serves a call: it runs on CUDA in half precision and has no dropout."""
    return varlen_attn is not None and cuda and p == 0 and dtype in (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Packed) -> torch.Tensor:
    """(T, heads, d) queries, keys, values -> (T, heads, d), each token attending within its sequence (CUDA, half
    precision, no dropout: see flash_applies)."""
    return varlen_attn(q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_len, batch.max_len)


# ---- pooling --------------------------------------------------------------------------------------------------
def pool(states: torch.Tensor, batch: Packed, mode: str) -> torch.Tensor:
    """(T, H) token states -> (count, H): each text's [CLS] state, or the mean over its tokens."""
    starts = batch.cu_seqlens[: batch.count].long()  # each text's first token is its [CLS]
    if mode == "cls":
        return states[starts]
    if mode == "mean":
        sums = states.new_zeros(len(batch.cu_seqlens) - 1, states.shape[-1]).index_add_(0, batch.sequence, states)
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1])[: batch.count]
        return sums[: batch.count] / lengths.unsqueeze(-1).to(states.dtype)
    raise ValueError(f"unknown pooling {mode!r} (cls or mean)")
