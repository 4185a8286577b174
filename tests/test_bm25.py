"""BM25 (bge/bm25.py), which --mine-with bm25 ranks candidates by: Lucene's scores, equal to bm25s's Lucene method
and to the formula written out per passage."""
import json
import math
from pathlib import Path

import bm25s
import numpy as np
import pytest

from bge.bm25 import BM25, STOP_WORDS, words

REPO = Path(__file__).resolve().parents[1]


def passages() -> list[str]:
    lines = [json.loads(l) for l in (REPO / "examples" / "bike_repair.jsonl").read_text().splitlines()]
    return [t for line in lines for t in line["pos"] + line.get("neg", [])]


QUERIES = ["how often should I replace a bike chain", "chain chain chain", "brake pads squeal in the rain",
           "The tyre, the TUBE and the valve!", "quantum chromodynamics"]


def naive(texts: list[str], query: str, k1: float, b: float) -> list[float]:
    """Lucene's BM25, one passage and one query word at a time."""
    docs = [words(t) for t in texts]
    avgdl = sum(map(len, docs)) / len(docs)
    out = []
    for d in docs:
        score = 0.0
        for w in words(query):  # a repeated query word counts each time
            df = sum(w in other for other in docs)
            if w in d:
                idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
                tf = d.count(w)
                score += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
        out.append(score)
    return out


@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.2, 0.75)])
def test_scores_equal_the_formula_and_bm25s_lucene(k1, b):
    texts = passages()
    index = BM25(texts, k1=k1, b=b)
    oracle = bm25s.BM25(method="lucene", k1=k1, b=b)
    oracle.index([words(t) for t in texts], show_progress=False)
    for q in QUERIES:
        ours = index.scores(q)
        np.testing.assert_allclose(ours, naive(texts, q, k1, b), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(ours, oracle.get_scores(words(q)), rtol=1e-5, atol=1e-6)  # bm25s keeps float32
    assert index.scores("quantum chromodynamics").max() == 0


def test_words_are_lowercased_runs_without_stop_words():
    assert words("The Tyre's TUBE, and a 28-inch valve!") == ["tyre", "s", "tube", "28", "inch", "valve"]
    assert {"the", "and", "a", "of", "with"} <= STOP_WORDS and "chain" not in STOP_WORDS


def test_top_is_best_first_ties_in_passage_order_and_never_ranks_a_passage_without_a_shared_word():
    texts = ["red bike", "blue car", "red bike", "red red bike bike", "green tree"]
    index = BM25(texts)
    top = index.top("red bike", 10)
    s = index.scores("red bike")
    assert [i for i, _ in top] == sorted((i for i in range(5) if s[i] > 0), key=lambda i: (-s[i], i))
    assert {i for i, _ in top} == {0, 2, 3} and top.index((0, s[0])) < top.index((2, s[2]))
    assert index.top("red bike", 2) == top[:2] and index.top("purple", 5) == []
