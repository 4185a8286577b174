"""Diagnostics: wins and losses ordered by change, thresholds that meet the asked precision (and are the lowest that
do), the text histogram, the optional PNG."""
import json
import random

import numpy as np
import pytest

from bge import diagnostics
from bge.diagnostics import compare, first_relevant_rank, text_histogram, threshold_at_precision, wins_and_losses


def toy(seed=0, n_queries=40, n_docs=30):
    """Two models' rankings (with scores) of the same queries, their per-query nDCG@10 and the qrels."""
    from bge.metrics import retrieval_metrics
    rng = random.Random(seed)
    qrels = {f"q{i}": {f"d{rng.randrange(n_docs)}": 1} for i in range(n_queries)}
    ranked, per_query = [], []
    for _ in range(2):
        r = {}
        for q in qrels:
            docs = rng.sample([f"d{j}" for j in range(n_docs)], 20)
            scores = sorted((rng.uniform(-0.2, 0.95) for _ in docs), reverse=True)
            r[q] = list(zip(docs, scores))
        ranked.append(r)
        per_query.append(retrieval_metrics(qrels, {q: [d for d, _ in h] for q, h in r.items()}, (10,)).per_query)
    return qrels, ranked, per_query


def test_wins_and_losses_are_ordered_by_change_with_ranks_and_top_hits():
    qrels, ranked, per_query = toy()
    queries = {q: f"text of {q}" for q in qrels}
    changes = wins_and_losses(per_query[0], per_query[1], ranked[0], ranked[1], qrels, queries, n=8)
    assert len(changes) == 8
    moves = [abs(c.change) for c in changes]
    assert moves == sorted(moves, reverse=True) and moves[-1] > 0
    everything = [abs(per_query[1][q]["ndcg@10"] - per_query[0][q]["ndcg@10"]) for q in qrels]
    assert moves[0] == max(everything) and moves[-1] >= sorted(everything, reverse=True)[7]  # the 8 largest
    for c in changes:
        assert c.query == f"text of {c.qid}" and c.change == c.after - c.before
        assert c.rank_before == first_relevant_rank(ranked[0][c.qid], qrels[c.qid])
        assert c.rank_after == first_relevant_rank(ranked[1][c.qid], qrels[c.qid])
        assert [d for d, _, _ in c.top_after] == [d for d, _ in ranked[1][c.qid][:3]]
        assert all(rel == (d in qrels[c.qid]) for d, _, rel in c.top_before + c.top_after)
        if c.change > 0:  # nDCG@10 with one relevant document rises only when it moves up
            assert c.rank_after is not None and (c.rank_before is None or c.rank_after < c.rank_before)


def test_first_relevant_rank():
    hits = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    assert first_relevant_rank(hits, {"b": 1, "c": 2}) == 2
    assert first_relevant_rank(hits, {"a": 0, "z": 1}) is None


def brute_force_threshold(pos, neg, precision):
    """Try every observed score as the cut-off; keep the lowest whose kept results are precise enough."""
    best = None
    for t in sorted(set(pos) | set(neg)):
        tp, fp = sum(s >= t for s in pos), sum(s >= t for s in neg)
        if tp + fp and tp / (tp + fp) >= precision and (best is None or t < best):
            best = t
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("precision", [0.5, 0.8, 0.95])
def test_threshold_meets_the_asked_precision_on_its_data_and_is_the_lowest(seed, precision):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(0.7, 0.1, 60), 2)  # rounding makes ties between and within the two sides
    neg = np.round(rng.normal(0.4, 0.15, 600), 2)
    t = threshold_at_precision(pos, neg, precision)
    assert t is not None
    kept_pos, kept_neg = (pos >= t.threshold).sum(), (neg >= t.threshold).sum()
    assert kept_pos / (kept_pos + kept_neg) >= precision  # met on the data it was computed from
    assert t.precision == kept_pos / (kept_pos + kept_neg) and t.kept == kept_pos + kept_neg
    assert t.recall == kept_pos / len(pos)
    assert t.threshold == brute_force_threshold(pos.tolist(), neg.tolist(), precision)


def test_threshold_when_no_cut_off_is_precise_enough():
    assert threshold_at_precision(np.array([0.1]), np.array([0.9, 0.8]), 0.9) is None
    assert threshold_at_precision(np.array([]), np.array([0.5]), 0.5) is None
    assert threshold_at_precision(np.array([0.9]), np.array([0.9]), 0.6) is None  # a tie cannot be split
    assert threshold_at_precision(np.array([0.9]), np.array([0.9]), 0.5).threshold == 0.9
    with pytest.raises(ValueError):
        threshold_at_precision(np.array([0.9]), np.array([]), 0.0)


def test_text_histogram_shares_sum_to_100_percent():
    pos, neg = np.array([0.9, 0.85, 0.5]), np.array([0.1, 0.2, 0.3, 0.5, 0.55])
    lines = text_histogram(pos, neg, bins=4, width=10)
    assert len(lines) == 5 and "relevant (n=3)" in lines[0] and "non-relevant (n=5)" in lines[0]
    shares = [[float(x.rstrip("%")) for x in line.split() if x.endswith("%")] for line in lines[1:]]
    assert abs(sum(s[0] for s in shares) - 100) < 0.2 and abs(sum(s[1] for s in shares) - 100) < 0.2
    assert lines[1].startswith("  0.70–0.90") and "█" in lines[1]  # high scores first


def test_compare_is_json_ready_and_renders(tmp_path):
    qrels, ranked, per_query = toy(1)
    c = compare(("base", "tuned"), tuple(per_query), tuple(ranked), qrels, {q: q for q in qrels}, n=3, precision=0.5)
    blob = json.loads(json.dumps(c.to_dict()))
    assert blob == c.to_dict()  # already in JSON's shapes (lists, not tuples)
    assert len(blob["changes"]) == 3 and all(ch["top_before"] and ch["top_after"] for ch in blob["changes"])
    assert set(blob["thresholds"]) == {"base", "tuned"}
    assert blob["counts"]["better"] + blob["counts"]["worse"] + blob["counts"]["same"] == len(qrels)
    pos, neg = c.scores["base"]
    assert len(pos) + len(neg) == 20 * len(qrels)
    from rich.console import Console
    console = Console(record=True, width=200)
    for r in diagnostics.render(c):
        console.print(r)
    text = console.export_text()
    assert f"{blob['counts']['same']} unchanged" in text and "threshold for precision 0.5" in text


def test_png_only_when_matplotlib_is_there(tmp_path):
    qrels, ranked, per_query = toy(2)
    c = compare(("base", "tuned"), tuple(per_query), tuple(ranked), qrels, {}, n=3, precision=0.5)
    path = diagnostics.plot_score_distributions(c.scores, tmp_path / "scores.png", c.thresholds)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert path is None and not (tmp_path / "scores.png").exists()
    else:
        assert path == tmp_path / "scores.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
