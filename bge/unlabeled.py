"""Training pairs from the domain's unlabeled passages: most users have far more passages than labelled queries.

    title  a passage's title as the query, its body as the positive (the (title, body) pairs of E5 and GTE)
    ict    inverse cloze (Lee et al., 2019): one sentence of a passage as the query, the rest of the passage as
           the positive; the sentence is taken out of its context, so the pair cannot be matched by copying words

The pairs are drawn once per run from the passages, by seed: each passage gives at most one pair of each kind.
`piece` cuts the pseudo-queries of the --distill-corpus stage (bge.tasks.CorpusTask): a sentence, or a span of words
of random length, drawn afresh each epoch.
train.py trains on them as a task of their own (bge.tasks.UnlabeledTask): their own micro-batches, in-batch
negatives, a share of each epoch set by --unlabeled-ratio. The passages are the run's corpus, so the test queries'
passages are among them, but never a test query: the text is what a user has before any label.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

from bge.data import DataError, Example, corpus_file, read_json_objects

# a sentence ends at . ! or ? followed by space and something that can start a sentence
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[\"'])")
MIN_WORDS = 4  # shorter titles and sentences say too little to be a query
SPAN_WORDS = 48  # the longest span `piece` cuts: about what the default --max-query-length of 64 tokens holds
KINDS = {"title": ("title",), "ict": ("ict",), "both": ("title", "ict"), "off": ()}


def sentences(text: str) -> list[str]:
    """The text cut at sentence ends (a heuristic for prose: abbreviations like 'e.g. A' cut too early)."""
    return [s.strip() for s in SENTENCE_END.split(text.strip()) if s.strip()]


def piece(body: str, usable: list[str], rng: random.Random) -> str:
    """A pseudo-query cut from a passage's body: half the time one of its `usable` sentences (MIN_WORDS+ words;
    always a span when it has none), else a span of consecutive words whose length is drawn uniformly from
    MIN_WORDS..SPAN_WORDS (at most the whole body)."""
    if usable and rng.random() < 0.5:
        return rng.choice(usable)
    words = body.split()
    n = rng.randint(min(MIN_WORDS, len(words)), min(SPAN_WORDS, len(words)))
    start = rng.randrange(len(words) - n + 1)
    return " ".join(words[start : start + n])


def pseudo_pairs(passages: list[tuple[str, str]], kinds: tuple[str, ...], seed: int) -> list[Example]:
    """(title, body) passages -> training examples: a title pair and an inverse-cloze pair per passage where the
    passage allows (a title of MIN_WORDS words; three sentences or more, one of them MIN_WORDS long)."""
    rng = random.Random(f"{seed}/unlabeled")
    out = []
    for n, (title, body) in enumerate(passages):
        title, body = title.strip(), body.strip()
        if "title" in kinds and len(title.split()) >= MIN_WORDS and len(body.split()) >= MIN_WORDS:
            out.append(Example(title, [body], qid=f"title:{n}"))
        if "ict" in kinds:
            sents = sentences(body)
            usable = [k for k, s in enumerate(sents) if len(s.split()) >= MIN_WORDS]
            if len(sents) >= 3 and usable:
                k = rng.choice(usable)
                rest = " ".join(sents[:k] + sents[k + 1:])
                out.append(Example(sents[k], [f"{title} {rest}".strip()], qid=f"ict:{n}"))
    return out


def read_passages(path: str | Path) -> list[tuple[str, str]]:
    """(title, text) of each line of a passage JSONL ({"title"?, "text"}), or of a BEIR folder's corpus.jsonl."""
    path = corpus_file(path, "unlabeled text")
    problems: list[str] = []
    out = []
    for n, obj in read_json_objects(path, problems):
        text, title = obj.get("text"), obj.get("title") or ""
        if not isinstance(text, str) or not isinstance(title, str):
            problems.append(f"{path}:{n}: text (and title, if present) must be strings")
            continue
        out.append((title, text))
    if problems:
        raise DataError(path, problems)
    return out


def unique(passages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The passages without repeats of the same (title, text), in first-seen order."""
    return list(dict.fromkeys(passages))
