"""Why a fine-tune helped or hurt: per-query wins and losses between two models, the score distributions of relevant
and non-relevant results, and the similarity threshold that reaches a chosen precision.

Pure functions on what evaluate_retrieval returns (per-query metrics and ranked lists with scores), then rendering:
    wins_and_losses          the queries whose metric changed most, with the relevant document's rank and the top hits
    retrieved_scores         cosine scores of relevant and non-relevant results in each query's top k
    threshold_at_precision   the lowest score cut-off whose results are at least that precise
    text_histogram           both distributions as terminal bars; plot_score_distributions: a PNG, if matplotlib is there
Fine-tuning moves the whole score scale (contrastive training at temperature 0.02 spreads cosines apart), so a threshold
tuned for the base model is wrong for the fine-tuned one: the suggestion is recomputed for each model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

Hit = tuple[str, float]  # (doc id, cosine)


@dataclass
class QueryChange:
    """One query's metric before and after, where its best relevant document ranked, and the top hits of each model."""

    qid: str
    query: str
    before: float
    after: float
    rank_before: int | None  # 1-based rank of the best-ranked relevant document; None: not in the top k
    rank_after: int | None
    top_before: list[tuple[str, float, bool]] = field(default_factory=list)  # (doc id, score, relevant)
    top_after: list[tuple[str, float, bool]] = field(default_factory=list)

    @property
    def change(self) -> float:
        return self.after - self.before


def first_relevant_rank(hits: list[Hit], rels: dict[str, int]) -> int | None:
    """1-based rank of the first hit judged relevant (grade > 0), None when no relevant document was retrieved."""
    return next((r for r, (d, _) in enumerate(hits, 1) if rels.get(d, 0) > 0), None)


def wins_and_losses(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                    ranked_before: dict[str, list[Hit]], ranked_after: dict[str, list[Hit]],
                    qrels: dict[str, dict[str, int]], queries: dict[str, str], n: int, *,
                    metric: str = "ndcg@10", top: int = 3) -> list[QueryChange]:
    """The n queries whose `metric` changed most between two models' per-query metrics, largest absolute change
    first (ties by query id); queries whose metric did not change are left out."""
    changes = []
    for qid in sorted(before.keys() & after.keys()):
        b, a = before[qid][metric], after[qid][metric]
        if a == b:
            continue
        rels = qrels.get(qid, {})
        hb, ha = ranked_before.get(qid, []), ranked_after.get(qid, [])
        changes.append(QueryChange(qid, queries.get(qid, ""), b, a, first_relevant_rank(hb, rels),
                                   first_relevant_rank(ha, rels),
                                   [(d, s, rels.get(d, 0) > 0) for d, s in hb[:top]],
                                   [(d, s, rels.get(d, 0) > 0) for d, s in ha[:top]]))
    changes.sort(key=lambda c: -abs(c.change))  # stable: equal changes keep query-id order
    return changes[:n]


def change_counts(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]],
                  metric: str = "ndcg@10") -> dict[str, int]:
    """How many queries got better, worse, or stayed the same on `metric`."""
    deltas = [after[q][metric] - before[q][metric] for q in before.keys() & after.keys()]
    return {"better": sum(d > 0 for d in deltas), "worse": sum(d < 0 for d in deltas),
            "same": sum(d == 0 for d in deltas)}


def retrieved_scores(ranked: dict[str, list[Hit]], qrels: dict[str, dict[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(relevant, non-relevant) cosine scores over every query's retrieved top k. Relevant documents ranked below k
    are not counted; neither are the non-relevant ones there, which score below every counted result of their query."""
    pos, neg = [], []
    for qid, hits in ranked.items():
        rels = qrels.get(qid, {})
        for d, s in hits:
            (pos if rels.get(d, 0) > 0 else neg).append(s)
    return np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)


@dataclass
class Threshold:
    """A score cut-off: results scoring >= threshold are kept; their precision and the share of relevant ones kept."""

    threshold: float
    precision: float
    recall: float
    kept: int


def threshold_at_precision(pos: np.ndarray, neg: np.ndarray, precision: float) -> Threshold | None:
    """The lowest cut-off t such that, of the scores >= t, at least `precision` are relevant: the most recall that
    precision allows on these scores. Cut-offs are tried at the observed scores, so ties are kept or dropped together.
    None when no cut-off is that precise."""
    if not 0 < precision <= 1:
        raise ValueError(f"precision must be in (0, 1], got {precision}")
    if len(pos) == 0:
        return None
    scores = np.concatenate([pos, neg])
    relevant = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(-scores, kind="stable")
    scores, relevant = scores[order], relevant[order]
    tp = np.cumsum(relevant)
    kept = np.arange(1, len(scores) + 1)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a cut at a score keeps every result with that score
    ok = np.flatnonzero(last_of_tie & (tp / kept >= precision - 1e-12))
    if len(ok) == 0:
        return None
    i = ok[-1]
    return Threshold(float(scores[i]), float(tp[i] / kept[i]), float(tp[i] / len(pos)), int(kept[i]))


def summary(scores: np.ndarray) -> dict[str, float]:
    """Count, mean and quartiles of a score sample (NaN when empty)."""
    if len(scores) == 0:
        return {"n": 0, "mean": float("nan"), "p25": float("nan"), "median": float("nan"), "p75": float("nan")}
    p25, med, p75 = np.percentile(scores, [25, 50, 75])
    return {"n": int(len(scores)), "mean": float(scores.mean()), "p25": float(p25), "median": float(med),
            "p75": float(p75)}


# ---- rendering -------------------------------------------------------------------------------------------
BLOCKS = " ▏▎▍▌▋▊▉█"


def _bar(share: float, width: int) -> str:
    """A bar of `share` (0..1) of `width` characters, in eighths of a character."""
    eighths = round(share * width * 8)
    return ("█" * (eighths // 8) + (BLOCKS[eighths % 8] if eighths % 8 else "")).ljust(width)


def text_histogram(pos: np.ndarray, neg: np.ndarray, *, lo: float | None = None, hi: float | None = None,
                   bins: int = 12, width: int = 24) -> list[str]:
    """Terminal lines: for each score bin, the share of relevant and of non-relevant results in it (each
    distribution sums to 100%, so a handful of positives and thousands of negatives are comparable)."""
    both = np.concatenate([pos, neg])
    if len(both) == 0:
        return ["(no scores)"]
    lo = float(both.min()) if lo is None else lo
    hi = float(both.max()) if hi is None else hi
    hi = hi if hi > lo else lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    hp = np.histogram(pos, edges)[0] / max(len(pos), 1)
    hn = np.histogram(neg, edges)[0] / max(len(neg), 1)
    top = max(hp.max(), hn.max(), 1e-12)
    lines = [f"{'score':>13}  {'relevant (n=' + format(len(pos), ',') + ')':<{width + 7}}  "
             f"non-relevant (n={len(neg):,})"]
    for i in range(bins - 1, -1, -1):  # high scores first, as a ranking reads
        lines.append(f"{edges[i]:>6.2f}–{edges[i + 1]:<6.2f}  {_bar(hp[i] / top, width)} {100 * hp[i]:5.1f}%  "
                     f"{_bar(hn[i] / top, width)} {100 * hn[i]:5.1f}%")
    return lines


def plot_score_distributions(dists: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                             thresholds: dict[str, Threshold | None] | None = None) -> Path | None:
    """A PNG with one panel per model: histograms of relevant and non-relevant scores (densities) and the suggested
    threshold. Needs matplotlib, which bge does not require: returns None when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(dists), figsize=(5 * len(dists), 3.5), sharex=True, squeeze=False)
    for ax, (name, (pos, neg)) in zip(axes[0], dists.items()):
        ax.hist(neg, bins=40, density=True, alpha=0.5, label=f"non-relevant (n={len(neg):,})")
        ax.hist(pos, bins=40, density=True, alpha=0.5, label=f"relevant (n={len(pos):,})")
        t = (thresholds or {}).get(name)
        if t is not None:
            ax.axvline(t.threshold, color="k", linestyle="--", label=f"threshold {t.threshold:.3f}")
        ax.set_title(name)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=8, loc="upper left")  # a fixed corner: "best" searches every bar, slowly on a busy CPU
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the whole comparison ------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """Everything the diagnostics section shows for two models on one retrieval set."""

    names: tuple[str, str]
    metric: str
    counts: dict[str, int]
    changes: list[QueryChange]
    scores: dict[str, tuple[np.ndarray, np.ndarray]]  # model -> (relevant, non-relevant) scores
    precision: float
    thresholds: dict[str, Threshold | None]

    def to_dict(self) -> dict:
        """JSON-able: the changes, the counts, score summaries and thresholds (not the raw scores), already in JSON's
        shapes (lists, not tuples), so that it equals its own JSON round trip."""
        return {"models": list(self.names), "metric": self.metric, "counts": self.counts,
                "changes": [asdict(c) | {"change": c.change, "top_before": [list(t) for t in c.top_before],
                                         "top_after": [list(t) for t in c.top_after]} for c in self.changes],
                "scores": {m: {"relevant": summary(p), "non_relevant": summary(n)} for m, (p, n) in self.scores.items()},
                "precision": self.precision,
                "thresholds": {m: asdict(t) if t else None for m, t in self.thresholds.items()}}


def compare(names: tuple[str, str], per_query: tuple[dict, dict], ranked: tuple[dict, dict],
            qrels: dict[str, dict[str, int]], queries: dict[str, str], *, n: int = 5, precision: float = 0.9,
            metric: str = "ndcg@10") -> Comparison:
    """Wins and losses of model 1 against model 0, both models' score distributions and thresholds at `precision`."""
    changes = wins_and_losses(per_query[0], per_query[1], ranked[0], ranked[1], qrels, queries, n, metric=metric)
    scores = {name: retrieved_scores(r, qrels) for name, r in zip(names, ranked)}
    thresholds = {name: threshold_at_precision(p, ng, precision) for name, (p, ng) in scores.items()}
    return Comparison(names, metric, change_counts(per_query[0], per_query[1], metric), changes, scores, precision,
                      thresholds)


def render(c: Comparison, corpus: dict[str, str] | None = None, snippet: int = 40) -> list:
    """Rich renderables for a terminal: the wins/losses table, one histogram per model, the thresholds."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    b, a = c.names
    table = Table(title=f"{c.metric} per query: {c.counts['better']} better, {c.counts['worse']} worse, "
                        f"{c.counts['same']} unchanged · the {len(c.changes)} that changed most")
    for col in ("query", c.metric, "relevant at", f"top 3 · {b}", f"top 3 · {a}"):
        table.add_column(col)

    def hits(top: list[tuple[str, float, bool]]) -> str:
        return "\n".join(f"{'✓' if rel else '·'} {s:.3f} {escape(d)}"
                         + (f" {escape(corpus.get(d, '')[:snippet])}" if corpus else "") for d, s, rel in top)

    for ch in c.changes:
        rank = lambda r: str(r) if r is not None else "-"
        style = "green" if ch.change > 0 else "red"
        table.add_row(f"{escape(ch.qid)}: {escape(ch.query[:80])}",
                      f"{ch.before:.3f} → {ch.after:.3f}\n[{style}]{ch.change:+.3f}[/]",
                      f"{rank(ch.rank_before)} → {rank(ch.rank_after)}", hits(ch.top_before), hits(ch.top_after))
    out: list = [table]
    everything = np.concatenate([np.concatenate(s) for s in c.scores.values()])
    lo, hi = (float(everything.min()), float(everything.max())) if len(everything) else (0.0, 1.0)
    for name, (pos, neg) in c.scores.items():
        t = c.thresholds[name]
        verdict = (f"score >= {t.threshold:.3f} keeps {t.kept:,} results at precision {t.precision:.3f}, "
                   f"recall {t.recall:.3f} of the relevant ones retrieved" if t else "no cut-off is that precise")
        lines = [f"{name}: cosine of relevant vs non-relevant results in the top k, share per bin "
                 f"(medians {summary(pos)['median']:.3f} vs {summary(neg)['median']:.3f})",
                 *text_histogram(pos, neg, lo=lo, hi=hi), f"threshold for precision {c.precision:g}: {verdict}"]
        out.append(Text("\n".join(lines)))
    return out
