"""Okapi BM25, the lexical ranking that hard negatives can be mined with instead of the model's own (`--mine-with
bm25`): passages that share a query's words but not its meaning, near misses a dense model may not rank near the top.

The scoring is Lucene's (what Anserini and Pyserini give the BEIR BM25 baselines), with their BEIR settings
k1 = 0.9, b = 0.4:

    score(q, d) = sum over the words t of q of  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

A word repeated in the query counts once per occurrence, as in a Lucene query of term clauses. Words are lower-cased
runs of letters and digits with Lucene's English stop words removed; unlike Lucene's English analyzer, they are not
Porter-stemmed (a stemmer is a page of rules, and for mining the ranking only has to find lexical neighbours).
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET
STOP_WORDS = frozenset("a an and are as at be but by for if in into is it no not of on or such that the their then "
                       "there these they this to was will with".split())


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in STOP_WORDS]


class BM25:
    """An inverted index over a list of passages; `scores` gives every passage's score for one query."""

    def __init__(self, texts: list[str], k1: float = 0.9, b: float = 0.4):
        counts = [Counter(words(t)) for t in texts]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        # the length normalisation of each passage, computed once: k1 * (1 - b + b * |d| / avgdl)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9)) if len(texts) else lengths
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for doc, c in enumerate(counts):
            for w, tf in c.items():
                docs, tfs = postings.setdefault(w, ([], []))
                docs.append(doc)
                tfs.append(tf)
        self.n = len(texts)
        # per word: the passages that contain it and each one's tf / (tf + norm), times the word's idf
        self.postings = {}
        for w, (docs, tfs) in postings.items():
            docs, tf = np.array(docs), np.array(tfs, dtype=np.float64)
            idf = np.log1p((self.n - len(docs) + 0.5) / (len(docs) + 0.5))
            self.postings[w] = (docs, idf * tf / (tf + norm[docs]))

    def scores(self, query: str) -> np.ndarray:
        out = np.zeros(self.n)
        for w, times in Counter(words(query)).items():
            if w in self.postings:
                docs, weight = self.postings[w]
                out[docs] += times * weight
        return out

    def top(self, query: str, k: int) -> list[tuple[int, float]]:
        """The k best (passage index, score), best first, ties in passage order; passages sharing no word with the
        query are never ranked (their order would be arbitrary)."""
        s = self.scores(query)
        order = np.lexsort((np.arange(self.n), -s))[:k]
        return [(int(i), float(s[i])) for i in order if s[i] > 0]
