"""Losses on embeddings, one per task type, distillation, and the L1 penalty. Pure functions: no logging, no
distributed calls, no state.

Retrieval (info_nce, false_negative_mask), STS (cosent, cosine_mse), classification (label_mask with info_nce,
head_cross_entropy); distillation from a teacher (embedding_distill, similarity_kl, distill_loss); l1_penalty for
regularisation.

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


# ---- STS / regression: scored pairs -------------------------------------------------------------------
def cosent(cos: torch.Tensor, gold: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT (Su, 2022): log(1 + sum over pairs (i, j) with gold_i > gold_j of exp(scale * (cos_j - cos_i))).
    A ranking loss on the pairs' cosine similarities: only the order of the gold scores matters, not their scale.
    cos and gold are (n,); a batch with no ordered pair gives 0."""
    diff = scale * (cos[None, :] - cos[:, None])  # [i, j] = scale * (cos_j - cos_i)
    ordered = gold[:, None] > gold[None, :]
    terms = torch.cat([diff.new_zeros(1), diff[ordered]])  # the 0 is the "1 +" inside the log
    return torch.logsumexp(terms, 0)


def cosine_mse(cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the pairs' cosine and a target already scaled to cosine's range
    (sentence-transformers' CosineSimilarityLoss)."""
    return F.mse_loss(cos, target.to(cos.dtype))


def pair_order_accuracy(cos: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Share of the pairs with gold_i > gold_j whose cosine is ordered the same way (1.0 when there are none)."""
    ordered = gold[:, None] > gold[None, :]
    if not ordered.any():
        return cos.new_ones(())
    return (cos[:, None] > cos[None, :])[ordered].float().mean()


# ---- classification: labelled texts ------------------------------------------------------------------
def label_mask(anchor_labels: torch.Tensor, passage_labels: torch.Tensor, pos_index: torch.Tensor) -> torch.Tensor:
    """(B, P) bool, True where passage j has anchor i's label but is not its positive: another text of the same
    class is no negative, so info_nce must not push it away. Labels are integer class ids."""
    same = anchor_labels[:, None] == passage_labels[None, :]
    same[torch.arange(len(pos_index), device=pos_index.device), pos_index] = False
    return same


def head_cross_entropy(emb: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a linear head (logits = emb @ weight.T + bias) on the pooled embeddings; (loss, accuracy)."""
    logits = emb @ weight.T + bias
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


# ---- regularisation ------------------------------------------------------------------------------------
def l1_penalty(params: list[torch.Tensor]) -> torch.Tensor:
    """Sum of absolute values of the given parameters (multiply by lambda and add to the loss)."""
    return torch.stack([p.abs().sum() for p in params]).sum()


# ---- distillation: a student matches a teacher's embeddings and in-batch similarities -------------------------
def embedding_distill(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over rows of 1 - cos(student, teacher) ("cosine"), or the mean squared difference of the L2-normalised
    embeddings ("mse", which equals 2 (1 - cos) / dim: the same direction at a smaller scale). (n, d) each."""
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(F.normalize(student, dim=-1), F.normalize(teacher, dim=-1))
    raise ValueError(f"unknown embedding distillation {kind!r} (cosine or mse)")


def similarity_kl(q_student: torch.Tensor, p_student: torch.Tensor, q_teacher: torch.Tensor, p_teacher: torch.Tensor,
                  temperature: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between each query's softmax distribution over the batch's passages (cosine /
    temperature), averaged over queries. `mask` (B, P) True removes a passage from both distributions (false
    negatives), so the student is not taught to rank a duplicate of the positive."""
    s = q_student @ p_student.T / temperature
    t = q_teacher @ p_teacher.T / temperature
    if mask is not None:
        s, t = s.masked_fill(mask, float("-inf")), t.masked_fill(mask, float("-inf"))
    log_s, log_t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    # a masked entry has p_t = 0 and contributes nothing (computed as 0, not 0 * (-inf - -inf) = nan)
    terms = torch.where(torch.isfinite(log_t), log_t.exp() * (log_t - log_s), torch.zeros_like(log_t))
    return terms.sum(-1).mean()


def distill_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], *, kind: str = "cosine",
                 weight: float = 1.0, kl_weight: float = 1.0, temperature: float = 0.05,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """weight * embedding term over every text (queries "q" and passages "p") + kl_weight * similarity_kl.
    kind "none" leaves out the embedding term (then teacher and student may differ in width)."""
    loss = student["q"].new_zeros(())
    if kind != "none" and weight:
        loss = loss + weight * embedding_distill(torch.cat([student["q"], student["p"]]),
                                                 torch.cat([teacher["q"], teacher["p"]]), kind)
    if kl_weight:
        loss = loss + kl_weight * similarity_kl(student["q"], student["p"], teacher["q"], teacher["p"], temperature,
                                                mask)
    return loss


# ---- teacher scores (FlagEmbedding's pos_scores/neg_scores) and Matryoshka ---------------------------------
def teacher_score_kl(q: torch.Tensor, p: torch.Tensor, owner: torch.Tensor, teacher_scores: torch.Tensor, temperature: float,
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
