"""Teacher scores for distillation: fill each training line's `pos_scores` and `neg_scores` (FlagEmbedding's
format) with a bi-encoder teacher's cosine similarities, for users without a reranker.

    python -m bge.score --teacher BAAI/bge-large-en-v1.5 --data mined.jsonl --out mined-scored.jsonl
    python train.py --data mined-scored.jsonl --corpus ../shared/data/scifact --kd-weight 1

Queries are encoded with the teacher's own query instruction (or --query-prompt), passages with its own passage
instruction (or --passage-prompt; most models have none). Every distinct passage is encoded once, through
evaluate.py's embedding cache. All other fields of a line are kept.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bge.checkpoint import atomic_write_text
from bge.config import Bounded, check_ranges
from bge.console import console, run_cli
from bge.data import Example, load_examples, read_json_objects
from bge.embedder import Embedder
from bge.errors import UserError
from bge.evaluation import encode_corpus, encode_queries, unit


def teacher_scores(teacher: Embedder, examples: list[Example], *, batch_size: int = 64, max_length: int | None = None,
                   query_prompt: str | None = None, cache_dir: str | Path | None = None,
                   cpu_bf16: bool = False) -> list[tuple[list[float], list[float]]]:
    """(pos_scores, neg_scores) of each example: the teacher's cosine of the query with each passage."""
    passages = {f"p{i}": t for i, t in enumerate(dict.fromkeys(t for ex in examples for t in ex.pos + ex.neg))}
    row = {t: i for i, t in enumerate(passages.values())}
    corpus = encode_corpus(teacher, passages, batch_size=batch_size, max_length=max_length, cache_dir=cache_dir,
                           cpu_bf16=cpu_bf16)
    queries = {str(i): ex.query for i, ex in enumerate(examples)}
    _, q_emb = encode_queries(teacher, queries, query_prompt=query_prompt, batch_size=batch_size,
                              max_length=max_length, cpu_bf16=cpu_bf16)
    q, p = unit(q_emb), unit(corpus.emb)
    out = []
    for i, ex in enumerate(examples):
        scores = p[[row[t] for t in ex.pos + ex.neg]] @ q[i]
        values = [round(float(s), 6) for s in scores]
        out.append((values[: len(ex.pos)], values[len(ex.pos):]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bge.score", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the teacher: folder, hub id, all-MiniLM-L6-v2 or auto")
    p.add_argument("--data", required=True, help="training JSONL (query, pos, neg)")
    p.add_argument("--out", required=True, help="the JSONL to write, with pos_scores and neg_scores")
    p.add_argument("--query-prompt", default=None, help="query instruction for the teacher (default: its own)")
    p.add_argument("--passage-prompt", default=None, help="passage instruction for the teacher (default: its own)")
    p.add_argument("--batch-size", type=Bounded(int, "[1, inf)"), default=64)
    p.add_argument("--max-length", type=Bounded(int, "[1, inf)"), default=None,
                   help="truncation length (default: the teacher's)")
    p.add_argument("--cache-dir", default="checkpoints/cache", help="passage embedding cache")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast when encoding on CPU (faster, not exact)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    a = check_ranges(p, p.parse_args(argv))
    if Path(a.out).resolve() == Path(a.data).resolve():
        raise UserError(f"--out {a.out} is the --data file; scoring writes a new file (pass another --out)")
    began = time.perf_counter()
    examples, _ = load_examples(a.data)  # every bad line is reported before the teacher loads
    teacher = Embedder.load(a.teacher, device=a.device, passage_prompt=a.passage_prompt)
    scores = teacher_scores(teacher, examples, batch_size=a.batch_size, max_length=a.max_length,
                            query_prompt=a.query_prompt, cache_dir=None if a.no_cache else a.cache_dir,
                            cpu_bf16=a.cpu_bf16)
    by_line = {ex.line: s for ex, s in zip(examples, scores)}
    lines = []
    for n, obj in read_json_objects(Path(a.data), []):
        pos, neg = by_line[n]
        lines.append(json.dumps({**obj, "pos_scores": pos, "neg_scores": neg}, ensure_ascii=False) + "\n")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(lines))
    console.print(f"wrote {out}: {len(lines):,} lines scored by {teacher.name} in {time.perf_counter() - began:.0f} s",
                  markup=False, highlight=False)


if __name__ == "__main__":
    run_cli(main)
