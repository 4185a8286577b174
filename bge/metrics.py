"""Evaluation metrics: trec_eval's retrieval metrics (as pytrec_eval computes them), STS correlations, and
classification by embeddings (kNN and a logistic-regression linear probe; accuracy and macro-F1 as scikit-learn
computes them)."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

METRICS = ("ndcg", "mrr", "recall", "map", "precision")


@dataclass
class RetrievalResult:
    """Retrieval metrics: means over scored queries and the per-query values they average."""

    summary: dict[str, float]  # "ndcg@10" -> mean over the n_scored queries
    per_query: dict[str, dict[str, float]]  # qid -> metric name -> value
    n_scored: int  # queries in qrels with at least one relevant document
    n_dropped: int  # queries in qrels with none: skipped, not scored as zero
    n_missing: int  # scored queries absent from the ranking, hence all zeros


def retrieval_metrics(
    qrels: dict[str, dict[str, int]],
    ranked: dict[str, list[str]],
    ks: Sequence[int] = (1, 3, 5, 10, 100),
    ignore_identical_ids: bool = False,
) -> RetrievalResult:
    """nDCG, MRR, recall, MAP and precision at each k, equal to trec_eval's ndcg_cut, recip_rank, recall, map_cut, P.

    `ranked[qid]` lists doc ids best first; `qrels[qid][docid] > 0` means relevant, with that value as the nDCG
    gain (0 and negative grades are judged non-relevant, gain 0). Queries with no relevant document are dropped and
    counted in `n_dropped`; queries in qrels but missing from `ranked` are scored as an empty ranking (all zeros);
    queries in `ranked` but not in qrels are ignored. MAP@k divides by the number of relevant documents R, as
    trec_eval does; sentence-transformers divides by min(k, R), which differs when R > k. With
    `ignore_identical_ids` a document whose id equals its query's id is removed from the ranking (MTEB, ArguAna).
    """
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    depth = ks[-1]
    qids = [q for q in qrels if any(g > 0 for g in qrels[q].values())]
    if not qids:
        raise ValueError("no query in qrels has a relevant document: nothing to score")

    # Grades of the top `depth` retrieved docs and of the ideal ranking, zero-padded: (n_queries, depth).
    gains = np.zeros((len(qids), depth))
    ideal = np.zeros((len(qids), depth))
    n_rel = np.zeros((len(qids), 1))
    for i, q in enumerate(qids):
        docs = ranked.get(q, [])
        if len(set(docs)) != len(docs):
            raise ValueError(f"query {q!r}: the ranking lists a document more than once")
        if ignore_identical_ids:
            docs = [d for d in docs if d != q]
        grades = qrels[q]
        gains[i, : min(len(docs), depth)] = [max(grades.get(d, 0), 0) for d in docs[:depth]]
        positive = sorted((g for g in grades.values() if g > 0), reverse=True)
        ideal[i, : min(len(positive), depth)] = positive[:depth]
        n_rel[i] = len(positive)

    rank = np.arange(1, depth + 1)
    discount = 1.0 / np.log2(rank + 1)
    dcg = np.cumsum(gains * discount, axis=1)
    idcg = np.cumsum(ideal * discount, axis=1)
    relevant = gains > 0
    hits = np.cumsum(relevant, axis=1)
    # Precision at each relevant doc's rank; summed up to k and divided by R this is average precision at k.
    sum_prec = np.cumsum(np.where(relevant, hits / rank, 0.0), axis=1)
    first = np.where(relevant.any(axis=1), relevant.argmax(axis=1) + 1, depth + 1)

    columns = {}
    for k in ks:
        columns[f"ndcg@{k}"] = dcg[:, k - 1] / idcg[:, k - 1]
        columns[f"mrr@{k}"] = np.where(first <= k, 1.0 / first, 0.0)
        columns[f"recall@{k}"] = hits[:, k - 1] / n_rel[:, 0]
        columns[f"map@{k}"] = sum_prec[:, k - 1] / n_rel[:, 0]
        columns[f"precision@{k}"] = hits[:, k - 1] / k
    names = [f"{m}@{k}" for k in ks for m in METRICS]
    values = np.stack([columns[n] for n in names], axis=1).tolist()
    return RetrievalResult(
        summary={n: float(columns[n].mean()) for n in names},
        per_query={q: dict(zip(names, row)) for q, row in zip(qids, values)},
        n_scored=len(qids),
        n_dropped=len(qrels) - len(qids),
        n_missing=sum(q not in ranked for q in qids),
    )


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with tied values sharing the mean of their ranks (scipy.stats.rankdata's 'average')."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Each run of equal values [start, end) gets rank (start + 1 + end) / 2.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant, as scipy returns."""
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def sts_correlations(predicted: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Spearman (average ranks for ties, as scipy.stats.spearmanr) and Pearson correlation of predicted vs gold."""
    x = np.asarray(predicted, dtype=np.float64).ravel()
    y = np.asarray(gold, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(f"predicted has {len(x)} scores but gold has {len(y)}")
    if len(x) < 2:
        raise ValueError(f"a correlation needs at least 2 pairs, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("scores must be finite (a NaN prediction usually means the model diverged)")
    return {"spearman": _pearson(_average_ranks(x), _average_ranks(y)), "pearson": _pearson(x, y)}


# ---- classification by embeddings --------------------------------------------------------------------
def classification_scores(predicted: Sequence, gold: Sequence) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-label F1 over every label in gold or predicted, a label
    never predicted nor present scoring 0), as sklearn's accuracy_score and f1_score(average='macro')."""
    pred, true = np.asarray(predicted), np.asarray(gold)
    if len(pred) != len(true) or len(true) == 0:
        raise ValueError(f"need as many predictions as gold labels (got {len(pred)} and {len(true)}), at least one")
    f1 = []
    for label in np.union1d(pred, true):
        tp = np.sum((pred == label) & (true == label))
        denom = np.sum(pred == label) + np.sum(true == label)  # 2tp + fp + fn
        f1.append(2 * tp / denom if denom else 0.0)
    return {"accuracy": float(np.mean(pred == true)), "macro_f1": float(np.mean(f1))}


def knn_predict(train_emb: torch.Tensor, train_labels: Sequence[int], test_emb: torch.Tensor, k: int = 5) -> np.ndarray:
    """Majority label among each test row's k most cosine-similar training rows; a tie goes to the smallest label
    id (sklearn's KNeighborsClassifier(metric='cosine') does the same). Labels are integer ids."""
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    a = torch.nn.functional.normalize(test_emb.double(), dim=1)
    b = torch.nn.functional.normalize(train_emb.double(), dim=1)
    nearest = (a @ b.T).topk(min(k, len(b)), dim=1).indices
    votes = torch.zeros(len(a), int(labels.max()) + 1, dtype=torch.long)
    votes.scatter_add_(1, labels[nearest], torch.ones_like(nearest))
    return votes.argmax(1).numpy()  # argmax returns the first maximum: the smallest id among tied labels


def fit_logistic_regression(emb: torch.Tensor, labels: Sequence[int], n_classes: int, c: float = 1.0,
                            max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression minimising c * sum of log-losses + ||W||^2 / 2 (sklearn's
    LogisticRegression(C=c) objective; the bias is not penalised), by L-BFGS in float64. Returns (W, b)."""
    x = emb.double()
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = c * torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum") + 0.5 * (w * w).sum()
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny products: handing each to a thread pool costs more than the maths
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return w.detach(), b.detach()


def linear_probe_predict(train_emb: torch.Tensor, train_labels: Sequence[int], test_emb: torch.Tensor,
                         n_classes: int) -> np.ndarray:
    """Labels that a logistic regression fitted on the training rows' embeddings gives the test rows."""
    w, b = fit_logistic_regression(train_emb, train_labels, n_classes)
    return (test_emb.double() @ w.T + b).argmax(1).numpy()
