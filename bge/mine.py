"""Hard-negative mining: retrieve each training query's top passages with a model and write the training JSONL
with `neg` filled from a band of ranks, never with the query's own positives.

    python -m bge.mine --data ../shared/data/scifact --split train --out scifact-mined.jsonl
    python -m bge.mine --data train.jsonl --corpus passages.jsonl --negatives 15 --range 10-200 --margin 5% --out mined.jsonl

The corpus is a BEIR folder's, a JSONL of passages (--corpus), or every passage of the training file. Search is
exact and the corpus embeddings are cached, as in evaluate.py; `--retriever bm25` ranks by BM25 over the passages'
words instead (bge/bm25.py), `--retriever hybrid` by both rankings fused, and the model still scores the candidates.
For each query the candidates at ranks A+1..B (`--range A-B`: skip the top A, as FlagEmbedding does) are filtered,
in this order:
    positive id     the passage is one of the query's positives (BEIR qrels; a JSONL's positives by text)
    positive text   its normalised text (case-folded, whitespace collapsed) is a positive's: a duplicate
    duplicate       its normalised text is already among this query's kept candidates
    margin          it scores above the query's weakest positive minus the margin (`--margin 0.05`) or above
                    (1 - p) times it (`--margin 5%`): likely an unlabelled positive (NV-Retriever's filters)
then `--negatives N` are drawn from what is left by a generator seeded with (seed, query id): the same inputs
give the same file. Each line keeps its qid, so train.py carves the same validation and test queries from the
mined file as from the BEIR folder. A report of what each filter removed is printed and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

from rich.table import Table

from bge.batching import normalise
from bge.bm25 import BM25
from bge.checkpoint import atomic_write_text
from bge.config import Bounded, check_ranges
from bge.console import console, progress, run_cli
from bge.data import (Example, RetrievalData, examples_from_beir, load_beir, load_corpus, load_examples,
                      retrieval_from_examples)
from bge.embedder import Embedder
from bge.errors import UserError
from bge.evaluation import CorpusCache, encode_corpus, encode_queries, rank, unit

FILTERS = ("positive id", "positive text", "duplicate", "margin")
RETRIEVERS = ("model", "bm25", "hybrid")  # what ranks the candidates


def parse_range(text: str) -> tuple[int, int]:
    """'10-200' -> (10, 200): candidates at 0-based positions 10..199 of the ranking, i.e. ranks 11 to 200."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not m or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"expected A-B with 0 <= A < B, e.g. 10-200, got {text!r}")
    return int(m[1]), int(m[2])


def parse_margin(text: str) -> tuple[float, bool]:
    """'0.05' -> (0.05, False): absolute; '5%' -> (0.05, True): relative to the positive's score."""
    relative = text.strip().endswith("%")
    try:
        value = float(text.strip().rstrip("%")) / (100 if relative else 1)
    except ValueError:
        value = -1.0
    if value < 0 or (relative and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a margin such as 0.05 (absolute) or 5% (relative), got {text!r}")
    return value, relative


def threshold(positive_score: float, margin: tuple[float, bool] | None) -> float:
    """The highest score a negative may have: the positive's minus the margin (or times 1 - relative margin)."""
    if margin is None:
        return float("inf")
    value, relative = margin
    return positive_score * (1 - value) if relative else positive_score - value


def filter_candidates(candidates: list[tuple[str, float]], texts: dict[str, str], positive_ids: set[str],
                      positive_texts: list[str], max_score: float) -> tuple[list[int], Counter]:
    """Positions in `candidates` ((doc id, score), best first) that may be negatives, and how many each filter
    removed (FILTERS, first match counts)."""
    pos_norm = {normalise(t) for t in positive_texts}
    kept, seen, removed = [], set(), Counter()
    for i, (doc, score) in enumerate(candidates):
        norm = normalise(texts[doc])
        reason = ("positive id" if doc in positive_ids else "positive text" if norm in pos_norm
                  else "duplicate" if norm in seen else "margin" if score > max_score else None)
        if reason:
            removed[reason] += 1
            continue
        kept.append(i)
        seen.add(norm)
    return kept, removed


def sample(kept: list[int], n: int, seed: int, qid: str) -> list[int]:
    """n of the kept positions (all when fewer), drawn by (seed, qid) alone, returned in rank order."""
    if len(kept) <= n:
        return list(kept)
    return sorted(random.Random(f"{seed}/mine/{qid}").sample(kept, n))


def fuse(rankings: list[list[str]], k: int = 60) -> list[str]:
    """Reciprocal rank fusion (Cormack et al., 2009): every id by the sum over the rankings of 1 / (k + its rank);
    ties in the order the ids were first met."""
    score: dict[str, float] = {}
    for ranking in rankings:
        for r, d in enumerate(ranking, start=1):
            score[d] = score.get(d, 0.0) + 1 / (k + r)
    return sorted(score, key=lambda d: -score[d])


def mine(embedder: Embedder, data: RetrievalData, examples: list[Example], *, negatives: int = 15,
         rank_range: tuple[int, int] = (10, 200), margin: tuple[float, bool] | None = None, seed: int = 0,
         batch_size: int = 64, max_length: int | None = None, query_max_length: int | None = None,
         cache_dir: str | Path | CorpusCache | None = None, cpu_bf16: bool = False, retriever: str = "model",
         show_progress: bool | None = None) -> tuple[list[dict], dict]:
    """Training lines with mined negatives, one per example (whose qid keys data.queries and data.qrels), and a
    report: counts per filter, candidates, negatives written, queries left with fewer than `negatives`. Queries are
    truncated at `query_max_length` (default: `max_length`). The candidates are ranked by the model, by BM25 over
    the passages' words (retriever="bm25", bge/bm25.py) or by the two rankings fused (hybrid); either way the margin
    filter scores them with the model."""
    if retriever not in RETRIEVERS:
        raise ValueError(f"retriever must be one of {', '.join(RETRIEVERS)}, got {retriever!r}")
    start, stop = rank_range
    corpus = encode_corpus(embedder, data.corpus, batch_size=batch_size, max_length=max_length, cache_dir=cache_dir,
                           cpu_bf16=cpu_bf16, show_progress=show_progress)
    queries = {ex.qid: ex.query for ex in examples}
    prompts = {ex.qid: ex.prompt for ex in examples if ex.prompt is not None}
    qids, q_emb = encode_queries(embedder, queries, prompts, batch_size=batch_size,
                                 max_length=query_max_length or max_length, cpu_bf16=cpu_bf16,
                                 show_progress=show_progress)
    q_unit, c_unit = unit(q_emb), unit(corpus.emb)
    row = {d: i for i, d in enumerate(corpus.ids)}
    ranked = rank(qids, q_emb, corpus.ids, corpus.emb, stop) if retriever != "bm25" else {}
    if retriever != "model":
        # BM25's order, or its fusion with the model's; each candidate keeps the model's score, which the margin filter
        # compares with the positive's
        index = BM25([data.corpus[d] for d in corpus.ids])
        for qi, qid in enumerate(qids):
            top = [corpus.ids[i] for i, _ in index.top(queries[qid], stop)]
            if retriever == "hybrid":
                top = fuse([top, [d for d, _ in ranked[qid]]])[:stop]
            picked = [row[d] for d in top]
            ranked[qid] = list(zip(top, (c_unit[picked] @ q_unit[qi]).tolist()))
    # a line that repeats an earlier line's query was folded into it (retrieval_from_examples): its relevant passages
    # are the query's, every line's positives, so that no line is given another line's positive as a negative
    holder = {m: h for h, folded in data.merged.items() for m in folded}
    totals = Counter()
    lines = []
    with progress(disable=show_progress is False) as bar:
        task = bar.add_task("filtering candidates", total=len(examples))
        for qi, ex in enumerate(examples):
            pos_ids = {d for d, g in data.qrels[holder.get(ex.qid, ex.qid)].items() if g > 0}
            positive_score = min(float(q_unit[qi] @ c_unit[row[d]]) for d in pos_ids)
            candidates = ranked[ex.qid][start:stop]
            kept, removed = filter_candidates(candidates, data.corpus, pos_ids, ex.pos, threshold(positive_score, margin))
            picked = sample(kept, negatives, seed, ex.qid)
            totals.update(removed)
            totals.update({"candidates": len(candidates), "kept": len(kept), "written": len(picked),
                           "short": len(picked) < negatives})
            line = {"qid": ex.qid, "query": ex.query, "pos": ex.pos, "neg": [data.corpus[candidates[i][0]] for i in picked]}
            if ex.prompt is not None:
                line["prompt"] = ex.prompt
            # for inspection only (train.py ignores it): where each negative came from
            line["mined"] = {"ids": [candidates[i][0] for i in picked], "ranks": [start + 1 + i for i in picked],
                             "scores": [round(candidates[i][1], 6) for i in picked],
                             "positive_score": round(positive_score, 6)}
            lines.append(line)
            bar.advance(task)
    report = {"queries": len(examples), "corpus": len(data.corpus), "retriever": retriever, "range": list(rank_range),
              "negatives": negatives,
              "margin": None if margin is None else {"value": margin[0], "relative": margin[1]}, "seed": seed,
              "candidates": totals["candidates"], "removed": {f: totals[f] for f in FILTERS}, "kept": totals["kept"],
              "written": totals["written"], "queries_short": totals["short"],
              "encoded": corpus.n_encoded, "cached": corpus.n_cached}
    return lines, report


def report_table(report: dict) -> Table:
    """What each filter removed, as counts and shares of the candidates in range."""
    a, b = report["range"]
    by = {"bm25": " by BM25", "hybrid": " by BM25 and the model"}.get(report.get("retriever"), "")
    table = Table(title=f"mined {report['queries']:,} queries against {report['corpus']:,} passages{by}, ranks {a + 1}-{b}")
    table.add_column("")
    table.add_column("candidates", justify="right")
    table.add_column("share", justify="right")
    total = max(report["candidates"], 1)
    rows = [("in range", report["candidates"])] + [(f"removed: {f}", n) for f, n in report["removed"].items()]
    rows += [("kept", report["kept"]), ("written as negatives", report["written"])]
    for name, n in rows:
        table.add_row(name, f"{n:,}", f"{100 * n / total:.1f}%")
    table.caption = (f"{report['queries_short']:,} queries got fewer than {report['negatives']} negatives"
                     if report["queries_short"] else None)
    return table


def load_input(data: str, split: str, corpus: str, use_title: bool) -> tuple[RetrievalData, list[Example]]:
    """The retrieval set to mine against and the training examples, keyed by qid."""
    path = Path(data)
    if path.is_dir():
        full = load_beir(path, split, use_title=use_title)
        examples = examples_from_beir(full)
        if corpus:  # the given corpus, with positives matched by text
            full = retrieval_from_examples(examples, full.name, corpus=load_corpus(corpus, use_title))
        return full, examples
    if not path.exists():
        raise UserError(f"--data {path}: no such file or folder")
    examples, _ = load_examples(path)
    return retrieval_from_examples(examples, path.name, corpus=load_corpus(corpus, use_title) if corpus else None), examples


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bge.mine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="training queries: a BEIR folder (with --split) or a training JSONL")
    p.add_argument("--split", default="train", help="BEIR qrels split whose queries are mined")
    p.add_argument("--corpus", default="", help="passages to mine from: a BEIR folder or a JSONL of {_id?, title?, "
                   "text} (default: the BEIR corpus, or every passage of the JSONL)")
    p.add_argument("--out", required=True, help="the training JSONL to write (a report goes next to it as .report.json)")
    p.add_argument("--model", default="auto", help="the model that retrieves: folder, hub id, all-MiniLM-L6-v2, auto")
    p.add_argument("--negatives", type=Bounded(int, "[1, inf)"), default=15, help="negatives per query")
    p.add_argument("--retriever", choices=RETRIEVERS, default="model", help="what ranks the candidates: the model, "
                   "BM25 over the passages' words (lexical near misses) or both fused by reciprocal rank (hybrid); the "
                   "margin filter always uses the model")
    p.add_argument("--range", type=parse_range, default=(10, 200), dest="rank_range",
                   help="A-B: sample from ranks A+1..B, skipping the top A (default 10-200)")
    p.add_argument("--margin", type=parse_margin, default=None, help="drop candidates scoring above the weakest "
                   "positive minus this (0.05) or above (1 - p) times it (5%%); default: no margin filter")
    p.add_argument("--seed", type=Bounded(int, "[0, inf)"), default=42)
    p.add_argument("--batch-size", type=Bounded(int, "[1, inf)"), default=64)
    p.add_argument("--max-length", type=Bounded(int, "[1, inf)"), default=None,
                   help="truncation length (default: the model's)")
    p.add_argument("--no-title", action="store_true", help="BEIR: embed the text alone, not title + ' ' + text")
    p.add_argument("--cache-dir", default="checkpoints/cache", help="corpus embedding cache (shared with evaluate.py)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast when encoding on CPU (faster, not exact)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = check_ranges(p, p.parse_args(argv))
    inputs = [Path(x).resolve() for x in (a.data, a.corpus) if x]
    if Path(a.out).resolve() in inputs + [x / "corpus.jsonl" for x in inputs]:
        raise UserError(f"--out {a.out} is an input of this run; mining writes a new file (pass another --out)")
    began = time.perf_counter()
    data, examples = load_input(a.data, a.split, a.corpus, not a.no_title)
    dropped = sum(ex.pos_scores is not None or ex.neg_scores is not None for ex in examples)
    embedder = Embedder.load(a.model, device=a.device)
    lines, report = mine(embedder, data, examples, negatives=a.negatives, rank_range=a.rank_range, margin=a.margin,
                         seed=a.seed, batch_size=a.batch_size, max_length=a.max_length,
                         cache_dir=None if a.no_cache else a.cache_dir, cpu_bf16=a.cpu_bf16, retriever=a.retriever)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    report |= {"model": embedder.name, "fingerprint": embedder.fingerprint(), "data": a.data, "corpus_path": a.corpus,
               "out": str(out), "seconds": time.perf_counter() - began}
    report_path = out.with_suffix(".report.json")
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
    console.print(report_table(report))
    if dropped:
        console.print(f"[yellow]{dropped} line(s) had teacher scores; they no longer match the new negatives and were "
                      f"not copied[/] (python -m bge.score fills them again)")
    console.print(f"wrote {out} and {report_path} in {report['seconds']:.0f} s", markup=False, highlight=False)
    corpus = a.corpus or (a.data if Path(a.data).is_dir() else "")
    if corpus:  # without it, train.py would evaluate on the passages of the file only
        console.print(f"train on it with: python train.py --data {out} --corpus {corpus}", markup=False, highlight=False)


if __name__ == "__main__":
    run_cli(main)
