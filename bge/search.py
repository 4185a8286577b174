"""Exact dense retrieval: top-k by dot product over a corpus too large for one score matrix."""

import torch


def _sort_desc_stable(scores: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row by score descending; equal scores keep their current order."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), idx.gather(1, order)


def _chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row by (score descending, column ascending), as a stable sort of the whole row would give."""
    # topk picks an arbitrary subset of the values tied with the k-th one. That matters only where it left one
    # out, which one extra value reveals; in those rows keep the leftmost tied columns instead.
    vals, idx = scores.topk(min(k + 1, scores.shape[1]), dim=1)
    kth = vals[:, k - 1 : k]
    bad = (vals[:, k:] == kth).any(1).nonzero().squeeze(1)
    vals, idx = vals[:, :k], idx[:, :k]
    if len(bad):
        s, t = scores[bad], kth[bad]
        above, tied = s > t, s == t
        keep = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
        idx[bad] = keep.nonzero()[:, 1].view(-1, k)  # nonzero is row-major: exactly k columns per row
        vals[bad] = s.gather(1, idx[bad])
    idx, order = idx.sort(dim=1)
    return _sort_desc_stable(vals.gather(1, order), idx)


@torch.no_grad()
def topk_search(
    queries: torch.Tensor,
    corpus: torch.Tensor,
    k: int,
    *,
    corpus_chunk: int = 50_000,
    query_chunk: int = 1024,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k corpus rows by dot product for each query: (scores, indices), both (n_queries, min(k, n_corpus)), on CPU.

    Equal to a stable descending sort of the full float32 score matrix (ties go to the lower corpus index),
    while holding at most one (query_chunk, corpus_chunk) block of scores on `device` (default: the queries').
    Embeddings must be finite: a NaN score has no place in that order.
    """
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        shapes = f"{tuple(queries.shape)} and {tuple(corpus.shape)}"
        raise ValueError(f"queries and corpus must be (n, dim) with the same dim, got {shapes}")
    if k < 1 or corpus_chunk < 1 or query_chunk < 1:
        raise ValueError(f"k, corpus_chunk and query_chunk must be positive, got {k}, {corpus_chunk}, {query_chunk}")
    device = torch.device(device) if device is not None else queries.device
    k = min(k, len(corpus))
    q_chunks = list(queries.to(device).float().split(query_chunk))
    # Running top-k per query chunk, ordered by (score desc, index asc); widths grow to k over the first chunks.
    best = [(q.new_empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.long, device=device)) for q in q_chunks]
    # Corpus chunks outermost, so each is moved to the device once; the corpus may live in CPU memory.
    for c0 in range(0, len(corpus), corpus_chunk):
        c = corpus[c0 : c0 + corpus_chunk].to(device).float()
        for j, q in enumerate(q_chunks):
            scores, idx = _chunk_topk(q @ c.T, min(k, len(c)))
            # Earlier chunks hold lower corpus indices, so appending keeps ties in index order for the stable sort.
            s, i = _sort_desc_stable(torch.cat([best[j][0], scores], 1), torch.cat([best[j][1], idx + c0], 1))
            best[j] = s[:, :k], i[:, :k]
    if not best:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat([s for s, _ in best]).cpu(), torch.cat([i for _, i in best]).cpu()
