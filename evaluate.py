"""Evaluate embedding models on retrieval (a BEIR folder or a training JSONL), STS (a score/sentence1/sentence2 TSV)
or classification (a JSONL of {text, label} rows).

    python evaluate.py --model BAAI/bge-small-en-v1.5 --data ../shared/data/scifact --split train
    python evaluate.py --model all-MiniLM-L6-v2 --model checkpoints/run/best --data ../shared/data/stsb/sts-dev.tsv
    python evaluate.py --model all-MiniLM-L6-v2 --model checkpoints/run/best --data ../shared/data/scifact \
        --split train --queries checkpoints/run/split.json --explain 5
    python evaluate.py --model all-MiniLM-L6-v2 --data examples/bike_tickets.jsonl
    python evaluate.py --model checkpoints/run/best --data ../shared/data/scifact --split train --dims 256,128,64
    python evaluate.py --compare checkpoints/*

Several --model values are evaluated on the same data and shown side by side, best per column in bold. Every number,
the model fingerprints and the dataset hash go to a JSON file (--out). Corpus embeddings are cached under
--cache-dir, keyed by model fingerprint, max length and corpus content, so evaluating the same model again
re-encodes nothing. `--explain N` (retrieval, two models) adds diagnostics: the N queries whose nDCG@10 changed most
between the first model and the second, each model's score distributions, and a threshold at --precision.
Classification rows are scored by kNN and a linear probe, fitted on --reference rows or by cross-validation.
--dims adds a row per model and size for embeddings truncated to that many dimensions and renormalised (Matryoshka),
from the same encoding.

--compare puts finished train.py runs side by side instead (the table sweep.py ends with): the settings that differ,
the held-out test metrics from each results.json, parameters, training time and measured encoding speed.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import rich.markup
from rich.table import Table

from bge import Embedder
from bge.checkpoint import atomic_write_text, json_text
from bge.config import Bounded, check_ranges
from bge.console import console, console_for, run_cli
from bge import diagnostics, malloc
from bge.data import ClassificationData, RetrievalData, STSData, load_eval_data
from bge.errors import UserError
from bge.evaluation import DEFAULT_KS, effective_max_length, evaluate_classification, evaluate_retrieval, evaluate_sts
from bge.hub import resolve_model
from bge.runs import add_table_args, as_run, is_run, model_label, report

COLUMNS = (("ndcg", "nDCG"), ("mrr", "MRR"), ("recall", "Recall"), ("recall", "Recall"), ("map", "MAP"),
           ("precision", "P"))
CLASSIFICATION_COLUMNS = [("knn_accuracy", "kNN acc"), ("knn_macro_f1", "kNN macro-F1"),
                          ("probe_accuracy", "probe acc"), ("probe_macro_f1", "probe macro-F1")]


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="model folder, hub id, all-MiniLM-L6-v2 or auto (repeatable; "
                   "default auto)")
    p.add_argument("--data", help="BEIR folder, training-format .jsonl, or STS .tsv/.jsonl (required unless --compare)")
    p.add_argument("--split", default="test", help="BEIR qrels split (qrels/<split>.tsv)")
    p.add_argument("--ks", type=parse_ks, default=list(DEFAULT_KS), help="cut-offs, e.g. 1,3,5,10,100")
    p.add_argument("--dims", type=parse_ks, default=[], help="also score embeddings truncated to these sizes, e.g. "
                   "256,128,64 (Matryoshka)")
    p.add_argument("--batch-size", type=Bounded(int, "[1, inf)"), default=64)
    p.add_argument("--max-length", type=Bounded(int, "[1, inf)"), default=None,
                   help="truncation length (default: the model's)")
    p.add_argument("--max-query-length", type=Bounded(int, "[1, inf)"), default=None, help="truncation length of "
                   "queries (default: --max-length); train.py validates and tests with its --max-query-length")
    p.add_argument("--query-prompt", default=None, help="query instruction, overriding the model's (not the "
                   "per-line prompts of a training JSONL); '' for none")
    p.add_argument("--passage-prompt", default=None, help="retrieval: passage instruction, overriding the model's "
                   "(its folder's document prompt); '' for none")
    p.add_argument("--no-title", action="store_true", help="BEIR: embed the text alone, not title + ' ' + text")
    p.add_argument("--ignore-identical-ids", action="store_true", help="skip a document whose id is the query's "
                   "(as MTEB does for ArguAna)")
    p.add_argument("--cache-dir", default="checkpoints/cache", help="corpus embedding cache")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast when encoding on CPU (faster, not exact)")
    p.add_argument("--malloc", choices=("keep", "system"), default="keep", help="keep = glibc malloc keeps freed "
                   "memory for the next batch (bge/malloc.py; encoding 10-14%% faster on CPU); system = glibc's defaults")
    p.add_argument("--out", default=None, help="results JSON (default checkpoints/eval/<dataset>-<time>.json; "
                   "--compare: the stem of its .csv/.md/.json)")
    p.add_argument("--queries", default=None, help="retrieval: evaluate only these queries: a JSON list of query ids, "
                   "or a train.py split.json (its test queries)")
    p.add_argument("--explain", type=Bounded(int, "[1, inf)"), default=None, metavar="N", help="retrieval, two models: the N queries "
                   "whose nDCG@10 changed most from the first model to the second, score distributions and thresholds")
    p.add_argument("--precision", type=Bounded(float, "(0, 1]"), default=0.9, help="--explain: suggest the similarity threshold that "
                   "reaches this precision (default 0.9)")
    p.add_argument("--plot", default=None, help="--explain: also write the score distributions as a PNG here (needs "
                   "matplotlib, which bge does not require)")
    p.add_argument("--reference", default=None, help="classification: fit kNN and the linear probe on these {text, "
                   "label} rows (default: cross-validation over --data)")
    p.add_argument("--folds", type=Bounded(int, "[2, inf)"), default=5, help="classification without --reference: folds (default 5)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="train.py run folders to tabulate (checkpoints/* is "
                   "fine: folders without results.json are skipped)")
    add_table_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    a = check_ranges(p, p.parse_args(argv))
    if not a.data and not a.compare:
        p.error("--data is required (or --compare RUN ...)")
    a.model = a.model or ["auto"]
    if a.explain and len(a.model) != 2:
        p.error("--explain compares two models: pass --model twice (before, then after)")
    return a


def query_subset(data: RetrievalData, path: str) -> RetrievalData:
    """`data` with only the queries listed in `path` (a JSON list of ids, or a train.py split.json: its test ids)."""
    try:
        ids = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--queries {path}: cannot read a JSON list of query ids ({e})") from None
    if isinstance(ids, dict):  # a split.json: per task since format 2, one list for every task before
        ids = ids.get("tasks", {}).get("retrieval", {}).get("test") if "tasks" in ids else ids.get("test")
    if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
        raise UserError(f"--queries {path}: expected a JSON list of query ids, or a split.json with retrieval test "
                        f"queries")
    holder = {line: q for q, lines in data.merged.items() for line in lines}  # a merged line's id names its query
    ids = [holder.get(str(i), str(i)) for i in ids]
    unknown = [i for i in ids if i not in data.queries]
    if unknown:
        raise UserError(f"--queries {path}: {len(unknown)} id(s) not among {data.name}'s queries, e.g. {unknown[0]!r}")
    sub = data.subset(ids)
    sub.name = f"{data.name} ({len(sub.queries)} queries of {Path(path).name})"
    return sub


def labels(names: list[str]) -> list[str]:
    """Short row labels (bge.runs.model_label: a run's best/ is `<run>/best`), unless two would then look alike."""
    short = [model_label(n) for n in names]
    return short if len(set(short)) == len(short) else names


def results_table(title: str, rows: list[dict], columns: list[tuple[str, str]], caption: str) -> Table:
    """One row per model, metrics x100, the best of each column in bold."""
    table = Table(title=title, caption=caption)
    table.add_column("model")
    for _, header in columns:
        table.add_column(header, justify="right")
    table.add_column("encoded", justify="right")
    table.add_column("time", justify="right")
    best = {key: max(round(100 * r["metrics"][key], 2) for r in rows) for key, _ in columns}
    for r in rows:
        cells = []
        for key, _ in columns:
            v = round(100 * r["metrics"][key], 2)
            cells.append(f"[bold]{v:.2f}[/]" if v == best[key] and len(rows) > 1 else f"{v:.2f}")
        table.add_row(rich.markup.escape(r["label"]), *cells, r["encoded"], f"{r['seconds']['total']:.1f} s")
    return table


def compare(a: argparse.Namespace) -> None:
    """One table of finished runs, written next to --out."""
    candidates = list(dict.fromkeys(as_run(Path(r)) for r in a.compare))  # a run's best/ counts as the run
    runs = [r for r in candidates if is_run(r)]
    skipped = len(candidates) - len(runs)
    if not runs:
        raise UserError(f"none of the {len(a.compare)} folders is a finished run (results.json and best/)")
    if skipped:
        console.print(f"skipped {skipped} folder(s) without results.json and best/")
    prefix = Path(a.out).with_suffix("") if a.out else Path(f"checkpoints/eval/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    table, png = report(runs, prefix, f"{len(runs)} runs", a)
    console_for("stdout").print(table)
    console.print(f"wrote {prefix}.csv, .md and .json" + (f" and {png}" if png else ""), markup=False, highlight=False)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.compare:
        return compare(a)
    data = load_eval_data(a.data, a.split, use_title=not a.no_title)  # bad files fail before any model loads
    retrieval = isinstance(data, RetrievalData)
    kind = "retrieval" if retrieval else "sts" if isinstance(data, STSData) else "classification"
    if a.queries:
        if not retrieval:
            raise UserError("--queries selects retrieval queries; --data is not a retrieval set")
        data = query_subset(data, a.queries)
    if retrieval and data.n_merged:
        console.print(data.merged_note(data.name), markup=False, highlight=False)
    if a.explain and not retrieval:
        raise UserError("--explain explains retrieval results; --data is not a retrieval set")
    reference = None
    if a.reference:
        if kind != "classification":
            raise UserError("--reference is for classification rows; --data is not a classification set")
        reference = load_eval_data(a.reference)
        if not isinstance(reference, ClassificationData):
            raise UserError(f"--reference {a.reference}: expected {{text, label}} rows")
    evals = []  # retrieval evaluations, kept for --explain
    cache_dir = None if a.no_cache else Path(a.cache_dir)
    folders = [resolve_model(name) for name in a.model]  # a missing model fails before the first one runs
    if a.malloc == "keep":
        console.print(malloc.keep_freed_memory(), style="dim", markup=False)  # what was done, or why not
    results = []
    for name, folder, label in zip(a.model, folders, labels(a.model)):
        start = time.perf_counter()
        embedder = Embedder.load(str(folder), device=a.device, passage_prompt=a.passage_prompt)
        loaded = time.perf_counter()
        row = {"model": name, "folder": str(folder), "label": label, "fingerprint": embedder.fingerprint(),
               "max_length": effective_max_length(embedder, a.max_length)}
        row["dim"] = embedder.dim
        if retrieval:
            res = evaluate_retrieval(embedder, data, ks=a.ks, batch_size=a.batch_size, max_length=a.max_length,
                                     query_max_length=a.max_query_length, query_prompt=a.query_prompt,
                                     cache_dir=cache_dir, device=a.device, ignore_identical_ids=a.ignore_identical_ids,
                                     cpu_bf16=a.cpu_bf16, dims=a.dims)
            m, rk = res.metrics, res.ranking
            row |= {"metrics": m.summary, "n_scored": m.n_scored, "n_dropped": m.n_dropped,
                    "n_encoded": rk.n_encoded, "n_cached": rk.n_cached, "seconds": dict(rk.seconds),
                    "query_prompt": a.query_prompt if a.query_prompt is not None else embedder.tokenizer.query_prompt,
                    "passage_prompt": embedder.tokenizer.passage_prompt,
                    "cache_file": str(rk.cache_file) if rk.cache_file else None}
            row["encoded"] = f"{rk.n_encoded:,}" if rk.n_encoded or cache_dir is None else "cached"
            truncated = {d: r.summary for d, r in res.by_dim.items()}
            evals.append(res)
        elif kind == "classification":
            if a.dims:
                raise UserError("--dims scores truncated embeddings for retrieval and STS, not classification")
            c = evaluate_classification(embedder, data, reference, folds=a.folds, batch_size=a.batch_size,
                                        max_length=a.max_length, cpu_bf16=a.cpu_bf16)
            row |= {"metrics": {k: c[k] for k, _ in CLASSIFICATION_COLUMNS}, "n_encoded": c["n_rows"],
                    "seconds": {"encode_and_fit": c["seconds"]}}
            row["encoded"] = f"{c['n_rows']:,}"
            truncated = {}
        else:
            sts = evaluate_sts(embedder, data, batch_size=a.batch_size, max_length=a.max_length, cpu_bf16=a.cpu_bf16,
                               dims=a.dims)
            row |= {"metrics": {"spearman": sts["spearman"], "pearson": sts["pearson"]},
                    "n_encoded": sts["n_encoded"], "seconds": {"encode": sts["seconds"]}}
            row["encoded"] = f"{sts['n_encoded']:,}"
            truncated = sts["by_dim"]
        row["seconds"] |= {"load": loaded - start, "total": time.perf_counter() - loaded}
        results.append(row)
        for d, metrics in truncated.items():  # same encoding, truncated: no time or encoding of its own
            results.append(row | {"label": f"{label} @{d}", "dim": d, "metrics": metrics, "encoded": "-",
                                  "seconds": {"total": 0.0}})
        del embedder

    if retrieval:
        main_k = 10 if 10 in a.ks else a.ks[-1]
        cuts = (main_k, main_k, main_k, a.ks[-1], a.ks[-1], main_k)
        columns = list(dict.fromkeys((f"{m}@{k}", f"{h}@{k}") for (m, h), k in zip(COLUMNS, cuts)))
        r0 = results[0]
        caption = (f"x100 · {r0['n_scored']:,} queries scored, {r0['n_dropped']:,} dropped (no relevant document) · "
                   f"{len(data.corpus):,} passages")
    elif kind == "classification":
        columns = CLASSIFICATION_COLUMNS
        how = f"fitted on {reference.name} ({len(reference.texts):,} rows)" if reference else f"{a.folds}-fold cross-validation"
        caption = f"x100 · {len(data.texts):,} rows, {len(set(data.labels))} labels · kNN (k=5) and linear probe {how}"
    else:
        columns = [("spearman", "Spearman"), ("pearson", "Pearson")]
        caption = f"x100, of cosine similarity · {len(data.scores):,} pairs"
    out = console_for("stdout")
    out.print(results_table(f"{data.name} · {kind if kind != 'sts' else 'STS'}", results, columns, caption))
    explained = None
    if a.explain:
        names = tuple(r["label"] for r in results if r.get("encoded") != "-")[:2]  # full-size rows, not --dims ones
        explained = diagnostics.compare(names, tuple(e.metrics.per_query for e in evals),
                                        tuple(e.ranking.ranked for e in evals), data.qrels, data.queries,
                                        n=a.explain, precision=a.precision)
        out.rule(f"why it changed: {names[0]} → {names[1]}")
        for renderable in diagnostics.render(explained, data.corpus):
            out.print(renderable)
        if a.plot:
            png = diagnostics.plot_score_distributions(explained.scores, a.plot, explained.thresholds)
            console.print(f"wrote {png}" if png else "--plot needs matplotlib (pip install matplotlib); no PNG written",
                          markup=False, highlight=False)

    slug = re.sub(r"[^\w.-]+", "-", re.sub(r"\.(tsv|jsonl|csv|txt)$", "", data.name)).strip("-") or "data"
    path = Path(a.out or f"checkpoints/eval/{slug}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    dataset = {"path": str(a.data), "name": data.name, "fingerprint": data.fingerprint(), "kind": kind}
    dataset |= ({"split": a.split, "n_queries": len(data.queries), "n_corpus": len(data.corpus),
                 "n_merged_lines": data.n_merged} if retrieval
                else {"n_pairs": len(data.scores)} if kind == "sts" else {"n_rows": len(data.texts)})
    if kind == "classification":  # what kNN and the probe were fitted on
        dataset |= ({"reference": str(a.reference), "n_reference_rows": len(reference.texts),
                     "reference_fingerprint": reference.fingerprint()} if reference else {"folds": a.folds})
    payload = {"dataset": dataset, "args": vars(a), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "models": [{k: v for k, v in r.items() if k not in ("label", "encoded")} for r in results]}
    if explained is not None:
        payload["diagnostics"] = explained.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json_text(payload) + "\n")  # an undefined metric (constant gold scores) as null, with why
    console.print(f"wrote {path}", markup=False, highlight=False)


if __name__ == "__main__":
    run_cli(main)
