"""Contrastive losses on embeddings. Pure functions: no logging, no distributed calls, no state.

Batch layout: B queries and P passages. Query i's positive is passages[pos_index[i]]; `owner[j]` is the query
that brought passage j (its positive or one of its hard negatives). Every other passage in the batch is an
in-batch negative unless it is masked: a passage whose text is one of query i's own positives is a false
negative, never pushed away (`false_negative_mask`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, dict]]  # embeddings by name -> (loss, statistics)


def false_negative_mask(passage_hashes: torch.Tensor, query_pos_hashes: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
    """(B, P) bool, True where passage j has the text of one of query i's positives but is not its labelled positive.
    passage_hashes (P,) int64; query_pos_hashes (B, K) int64 padded with -1 (hashes are non-negative)."""
    same = (passage_hashes[None, :, None] == query_pos_hashes[:, None, :]).any(-1)
    same[torch.arange(len(pos_index), device=pos_index.device), pos_index] = False
    return same


def info_nce(q: torch.Tensor, p: torch.Tensor, pos_index: torch.Tensor, temperature: float, *,
             mask: torch.Tensor | None = None, owner: torch.Tensor | None = None, in_batch: bool = True,
             symmetric: bool = False, query_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each query against its positive, its hard negatives and (in_batch) every other passage.

    q (B, d) and p (P, d) are L2-normalised, so q @ p.T is cosine similarity; scores are divided by the
    temperature (BGE uses 0.02). `mask` (B, P) removes false negatives. Without in-batch negatives a query sees
    only the passages it brought (`owner[j] == i`). `symmetric` adds the passage-to-query term: each positive
    against every query in the batch. `query_offset` says where these B queries start in `owner` numbering
    (non-zero when p holds passages gathered from other devices). Returns (loss, accuracy of the argmax).
    """
    scores = q @ p.T / temperature  # (B, P)
    rows = torch.arange(len(q), device=q.device)
    drop = torch.zeros_like(scores, dtype=torch.bool) if mask is None else mask.clone()
    if not in_batch:
        drop |= owner[None, :] != (rows + query_offset)[:, None]
    scores = scores.masked_fill(drop, float("-inf"))
    loss = F.cross_entropy(scores, pos_index)
    accuracy = (scores.argmax(1) == pos_index).float().mean()
    if symmetric:
        # passage -> query: positive i against all queries; query j is a false negative for it when
        # mask[j] marks that passage as one of query j's positives too
        back = p[pos_index] @ q.T / temperature  # (B, B)
        back_drop = drop[:, pos_index].T if mask is not None else torch.zeros_like(back, dtype=torch.bool)
        if not in_batch:
            back_drop = back_drop | ~torch.eye(len(q), dtype=torch.bool, device=q.device)
        loss = (loss + F.cross_entropy(back.masked_fill(back_drop, float("-inf")), rows)) / 2
    return loss, accuracy


def distill_kl(q: torch.Tensor, p: torch.Tensor, owner: torch.Tensor, teacher_scores: torch.Tensor, temperature: float,
               teacher_temperature: float) -> torch.Tensor:
    """KL(teacher || student) over each query's own group (its positive and its hard negatives), averaged over
    queries: FlagEmbedding's distillation term.

    The student's distribution for query i is softmax(q_i . p_j / temperature) over the passages it brought
    (owner[j] == i); the teacher's is softmax(teacher_scores[j] / teacher_temperature) over the same passages.
    In-batch passages have no teacher score, so they take no part. No false-negative mask: the teacher's scores
    already say how relevant each passage of the group is."""
    rows = torch.arange(len(q), device=q.device)
    outside = owner[None, :] != rows[:, None]  # (B, P): passages query i did not bring
    student = (q @ p.T / temperature).masked_fill(outside, float("-inf")).log_softmax(1)
    teacher = (teacher_scores[None, :].float() / teacher_temperature).masked_fill(outside, float("-inf")).log_softmax(1)
    kl = torch.where(outside, 0.0, teacher.exp() * (teacher - student))  # 0 * -inf outside the group would be NaN
    return kl.sum(1).mean()


def truncate(emb: torch.Tensor, dim: int) -> torch.Tensor:
    """The first `dim` coordinates of each embedding, L2-normalised again (a Matryoshka embedding of that size)."""
    return F.normalize(emb[:, :dim], dim=-1)


def matryoshka(loss_fn: LossFn, emb: dict[str, torch.Tensor], dims: list[int]) -> tuple[torch.Tensor, dict]:
    """Matryoshka representation learning (Kusupati et al., 2022): loss_fn on the full embeddings plus loss_fn on
    each truncated, renormalised size in `dims` (weight 1 each, as sentence-transformers' MatryoshkaLoss). The
    statistics are the full size's. loss_fn maps a dict of embeddings to (loss, statistics)."""
    full = next(iter(emb.values())).shape[-1]
    loss, stats = loss_fn(emb)
    for d in sorted(set(dims) - {full}, reverse=True):
        if not 0 < d < full:
            raise ValueError(f"Matryoshka dimension {d} is outside 1..{full} (the embedding size)")
        loss = loss + loss_fn({k: truncate(e, d) for k, e in emb.items()})[0]
    return loss, stats
