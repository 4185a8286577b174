import math
import random

import numpy as np
import pytest
import pytrec_eval  # the oracles: a missing one must fail, not skip
import scipy.stats
import sklearn.linear_model
import sklearn.metrics
import sklearn.neighbors
import torch

from bge.evaluation import cross_validation_folds
from bge.metrics import (classification_scores, fit_logistic_regression, knn_predict, linear_probe_predict,
                         retrieval_metrics, sts_correlations)

KS = (1, 3, 5, 10, 20)
TREC = {"ndcg": "ndcg_cut_{}", "map": "map_cut_{}", "recall": "recall_{}", "precision": "P_{}"}


def random_case(seed: int, n_queries: int = 150, n_docs: int = 60):
    """Graded qrels and rankings covering the edge cases: no relevant docs, R > k, short runs, absent queries."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, ranked = {}, {}
    for i in range(n_queries):
        q = f"q{i}"
        judged = rng.sample(docs, rng.choice([0, 1, 2, 5, 15, 30]))  # 30 judged gives R > k for most k
        qrels[q] = {d: rng.choice([-1, 0, 0, 1, 2, 3]) for d in judged}
        if i % 10 == 0:
            qrels[q] = {d: 0 for d in judged}  # judged but none relevant: dropped
        if i % 13 == 0:
            continue  # absent from the run: scored as all zeros
        ranked[q] = rng.sample(docs, rng.choice([0, 1, 4, 10, 25, 60]))
    ranked["not_in_qrels"] = docs[:5]
    return qrels, ranked


def trec_eval(qrels, ranked, ks):
    """pytrec_eval's per-query values under our metric names, for queries it scores."""
    measures = {m.format(k) for m in TREC.values() for k in ks} | {"recip_rank"}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures)
    out = {}
    for k in ks:
        # recip_rank has no cut, so MRR@k is recip_rank on the run truncated to k; distinct decreasing
        # scores stop trec_eval's own tie-breaking from reordering.
        run = {q: {d: float(len(docs) - r) for r, d in enumerate(docs[:k])} for q, docs in ranked.items()}
        for q, vals in pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run).items():
            out.setdefault(q, {})[f"mrr@{k}"] = vals["recip_rank"]
    run = {q: {d: float(len(docs) - r) for r, d in enumerate(docs)} for q, docs in ranked.items()}
    for q, vals in evaluator.evaluate(run).items():
        for name, trec in TREC.items():
            for k in ks:
                out[q][f"{name}@{k}"] = vals[trec.format(k)]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pytrec_eval(seed):
    qrels, ranked = random_case(seed)
    res = retrieval_metrics(qrels, ranked, ks=KS)
    oracle = trec_eval(qrels, ranked, KS)

    has_rel = {q for q, g in qrels.items() if any(v > 0 for v in g.values())}
    assert res.n_dropped == len(qrels) - len(has_rel) > 0
    assert res.n_scored == len(has_rel)
    assert res.n_missing == len(has_rel - ranked.keys()) > 0
    assert set(res.per_query) == has_rel
    # pytrec_eval also scores the queries without relevant docs (as zeros) and skips those not in the run.
    zeros = {name: 0.0 for name in res.summary}
    expected = {q: oracle.get(q, zeros) for q in has_rel}
    assert any(q not in oracle for q in has_rel)
    assert any(sum(v > 0 for v in qrels[q].values()) > 10 for q in has_rel)  # R > k for k <= 10

    for q in has_rel:
        assert res.per_query[q].keys() == expected[q].keys()
        for name, value in expected[q].items():
            assert abs(res.per_query[q][name] - value) <= 1e-6, (q, name)
    for name, mean in res.summary.items():
        assert abs(mean - np.mean([expected[q][name] for q in has_rel])) <= 1e-6, name


def test_hand_computed():
    # Ranking a b c d e with grades 3 0 2 - 1 (d unjudged); f (grade 2) is never retrieved; R = 4 (a c e f).
    qrels = {"q": {"a": 3, "b": 0, "c": 2, "e": 1, "f": 2}}
    ranked = {"q": ["a", "b", "c", "d", "e"]}
    res = retrieval_metrics(qrels, ranked, ks=(1, 3, 5))
    m = res.per_query["q"]
    # DCG@5 = 3/log2(2) + 2/log2(4) + 1/log2(6) = 3 + 1 + 0.386853 = 4.386853
    # IDCG@5 from grades 3 2 2 1: 3 + 2/log2(3) + 2/log2(4) + 1/log2(5) = 3 + 1.261860 + 1 + 0.430677 = 5.692536
    assert m["ndcg@5"] == pytest.approx(4.386853 / 5.692536, abs=1e-6)
    # DCG@3 = 3 + 1 = 4; IDCG@3 = 3 + 1.261860 + 1 = 5.261860
    assert m["ndcg@3"] == pytest.approx(4 / 5.261860, abs=1e-6)
    assert m["ndcg@1"] == 1.0
    # Relevant at ranks 1, 3, 5 with precision 1/1, 2/3, 3/5; MAP divides by R = 4 (not min(k, R)).
    assert m["map@5"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert m["map@3"] == pytest.approx((1 + 2 / 3) / 4)
    assert m["map@1"] == pytest.approx(1 / 4)
    assert m["recall@5"] == pytest.approx(3 / 4)
    assert m["recall@3"] == pytest.approx(2 / 4)
    assert m["precision@5"] == pytest.approx(3 / 5)
    assert m["precision@3"] == pytest.approx(2 / 3)
    assert m["mrr@1"] == 1.0


def test_hand_computed_mrr_and_short_ranking():
    # First relevant doc at rank 3; only 3 docs retrieved, so precision@5 still divides by 5.
    qrels = {"q": {"c": 1, "z": 1}, "empty": {"a": 0}, "absent": {"a": 1}}
    ranked = {"q": ["a", "b", "c"]}
    res = retrieval_metrics(qrels, ranked, ks=(1, 2, 3, 5))
    m = res.per_query["q"]
    assert (m["mrr@1"], m["mrr@2"], m["mrr@3"], m["mrr@5"]) == (0.0, 0.0, pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert m["precision@5"] == pytest.approx(1 / 5)
    # ndcg@3 = (1/log2(4)) / (1 + 1/log2(3)) = 0.5 / 1.630930
    assert m["ndcg@3"] == pytest.approx(0.5 / 1.630930, abs=1e-6)
    assert all(v == 0.0 for v in res.per_query["absent"].values())
    assert (res.n_scored, res.n_dropped, res.n_missing) == (2, 1, 1)
    assert res.summary["mrr@3"] == pytest.approx(1 / 6)


def test_negative_grades_are_non_relevant():
    # trec_eval gives negative grades no gain (not a negative one); pytrec_eval agrees.
    qrels = {"q": {"a": -1, "b": 2, "c": -2}}
    ranked = {"q": ["a", "c", "b"]}
    m = retrieval_metrics(qrels, ranked, ks=(3,)).per_query["q"]
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(4))
    assert m["precision@3"] == pytest.approx(1 / 3)
    oracle = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_3"}).evaluate({"q": {"a": 3.0, "c": 2.0, "b": 1.0}})
    assert m["ndcg@3"] == pytest.approx(oracle["q"]["ndcg_cut_3"])


def test_ignore_identical_ids():
    qrels = {"q1": {"d1": 1}}
    ranked = {"q1": ["q1", "d1"]}
    assert retrieval_metrics(qrels, ranked, ks=(1,)).summary["mrr@1"] == 0.0
    assert retrieval_metrics(qrels, ranked, ks=(1,), ignore_identical_ids=True).summary["mrr@1"] == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="more than once"):
        retrieval_metrics({"q": {"a": 1}}, {"q": ["a", "a"]})
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics({"q": {"a": 0}}, {"q": ["a"]})
    with pytest.raises(ValueError, match="positive"):
        retrieval_metrics({"q": {"a": 1}}, {"q": ["a"]}, ks=(0, 1))


@pytest.mark.parametrize("ties", [False, True])
def test_sts_correlations_match_scipy(ties):
    rng = np.random.default_rng(int(ties))
    gold = rng.integers(0, 6, 300).astype(float) if ties else rng.normal(size=300)
    pred = gold + rng.normal(size=300)
    if ties:
        pred = np.round(pred)  # ties on both sides
    out = sts_correlations(pred.tolist(), gold)
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(pred, gold).statistic, abs=1e-12)
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(pred, gold).statistic, abs=1e-12)


def test_sts_correlations_bad_input():
    with pytest.raises(ValueError, match="gold has 2"):
        sts_correlations([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2"):
        sts_correlations([1.0], [1.0])
    assert math.isnan(sts_correlations([1.0, 1.0], [1.0, 2.0])["pearson"])


# ---- classification by embeddings, against scikit-learn -------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_macro_f1_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 5, 60)
    pred = np.where(rng.random(60) < 0.6, gold, rng.integers(0, 6, 60))  # label 5 is predicted but never gold
    ours = classification_scores(pred, gold)
    assert math.isclose(ours["accuracy"], sklearn.metrics.accuracy_score(gold, pred), abs_tol=1e-12)
    assert math.isclose(ours["macro_f1"], sklearn.metrics.f1_score(gold, pred, average="macro", zero_division=0),
                        abs_tol=1e-12)
    names = np.array(list("abcdef"))  # string labels work the same
    assert classification_scores(names[pred], names[gold]) == ours


def clusters(seed, n=90, dim=16, classes=4, spread=0.9):
    """Noisy points around one random centre per class, as unit-norm float32 embeddings."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.nn.functional.normalize(centres[y] + spread * torch.randn(n, dim, generator=g), dim=1)
    return x, y.numpy()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 5])
def test_knn_equals_sklearn_cosine_knn_ties_included(seed, k):
    x, y = clusters(seed)
    train, test = slice(0, 60), slice(60, None)
    ours = knn_predict(x[train], y[train], x[test], k)
    ref = sklearn.neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    ref.fit(x[train].numpy().astype(np.float64), y[train])
    assert (ours == ref.predict(x[test].numpy().astype(np.float64))).all()


@pytest.mark.parametrize("seed", range(3))
def test_logistic_regression_equals_sklearn(seed):
    x, y = clusters(seed, classes=5, spread=1.5)
    w, b = fit_logistic_regression(x, y, 5, c=1.0)
    ref = sklearn.linear_model.LogisticRegression(C=1.0, tol=1e-10, max_iter=2000).fit(x.numpy().astype(np.float64), y)
    assert np.abs(ref.coef_ - w.numpy()).max() < 1e-4 and np.abs(ref.intercept_ - b.numpy()).max() < 1e-4
    assert (linear_probe_predict(x[:60], y[:60], x[60:], 5) == sklearn.linear_model.LogisticRegression(C=1.0)
            .fit(x[:60].numpy().astype(np.float64), y[:60]).predict(x[60:].numpy().astype(np.float64))).all()


def test_cross_validation_folds_keep_the_label_mix():
    labels = ["a"] * 10 + ["b"] * 7 + ["c"] * 3
    fold = cross_validation_folds(labels, 5, seed=0)
    assert fold == cross_validation_folds(labels, 5, seed=0) and fold != cross_validation_folds(labels, 5, seed=1)
    assert sorted(np.bincount(fold).tolist()) == [4, 4, 4, 4, 4]
    for label, n in (("a", 10), ("b", 7)):
        per_fold = np.bincount([f for f, l in zip(fold, labels) if l == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == n
