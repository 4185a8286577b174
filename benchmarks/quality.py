"""Fine-tuning quality side by side: bge's recipes against sentence-transformers' MultipleNegativesRankingLoss, on
the same training queries, scored on the same carved test queries by the same evaluation code, over several seeds.

    python benchmarks/quality.py --data ../shared/data/scifact --seeds 1,2,3 --out checkpoints/quality/scifact
    python benchmarks/quality.py --data examples/bike_repair.jsonl --bge "t05=--temperature 0.05" --st default=

The held-out split is bge's (bge.tasks.split_items at --split-seed, 15% validation + 15% test by default), fixed
for every seed and recipe; only the training seed varies. Every model is then scored by bge.evaluation on the test
queries against the whole corpus (and on --probe, a general STS set), in one precision for all.

Recipes:
  --bge NAME=FLAGS   `train.py --data DATA --split-seed S --seed SEED FLAGS`; what the run exports is scored
                     (merged/ if the run made one, else best/). `--bge default=` is train.py with no other flag.
  --st NAME=OPTS     sentence-transformers' SentenceTransformerTrainer with MultipleNegativesRankingLoss, at the
                     defaults of its documentation (batch 32, lr 2e-5, warmup 10%, scale 20 = temperature 0.05,
                     1 epoch, the no-duplicates batch sampler, fp32), on every (query, positive) pair of the
                     training queries: those of train.py's training AND validation split (ST uses no validation),
                     never a test query. OPTS override: --epochs, --lr, --batch-size, --scale, and --negatives N
                     (N hard negatives per pair as extra columns, from the data's `neg` or from --negatives-file).
Seeds are the outer loop, recipes run in the order given (after the first seed every recipe has a number). Each
(recipe, seed) runs in a fresh process; its scores go to OUT/runs/<recipe>/seed<k>/score.json as soon as it ends,
so an interrupted benchmark picks up where it stopped; a (recipe, seed) being run is locked, so the same command
started twice shares the seeds out between two processes (two lanes on two cores) instead of clearing each other's
run. The table shows mean ± sd over seeds and every seed's number, the change from the base model and from the first
sentence-transformers recipe, each with a paired 95% bootstrap interval over the test queries (per-query nDCG@10,
each side averaged over its seeds, against a recipe over the seeds both ran: would the difference hold on other test
queries?), training time and the command's whole wall time; OUT/quality.json holds all of it, every query's score
included.

One-knob changes: `--vs "bge default"` pairs every recipe with bge's default instead, on the seeds both ran, each
seed's difference shown beside the pooled one (same seed = same sampler order and dropout draws):

    python benchmarks/quality.py --data ../shared/data/scifact --seeds 1,2,3 --bge default= \
        --bge "attn-dropout-0=--attention-dropout 0" --vs "bge default"

`--no-train` reports what is saved under --out and trains nothing: the table of runs made by several commands
(recipes with different seeds) from one command.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import print_table, write_json
from bge.checkpoint import atomic_write_text
from bge.console import console, run_cli
from bge.data import examples_from_beir, load_beir, load_corpus, load_examples, load_sts, retrieval_from_examples
from bge.embedder import Embedder, native_cpu_bf16
from bge.errors import UserError
from bge.evaluation import evaluate_retrieval, evaluate_sts
from bge.hub import resolve_model
from bge.tasks import split_items

REPO = Path(__file__).resolve().parents[1]
KS = (1, 10, 100)


# ---- data and the fixed split ---------------------------------------------------------------------------
def load_data(a: argparse.Namespace):
    """(examples, full evaluation set): the retrieval lines exactly as train.py reads them, and the corpus they are
    searched in (BEIR: the whole corpus; JSONL: the file's passages, plus --corpus)."""
    path = Path(a.data)
    if path.is_dir():
        full = load_beir(path, a.split)
        return examples_from_beir(full), full
    examples, _ = load_examples(path)
    corpus = load_corpus(a.corpus) if a.corpus else None
    return examples, retrieval_from_examples(examples, name=path.name, corpus=corpus)


def fixed_split(examples, a) -> dict[str, list[int]]:
    """Indices of the examples in train / val / test, as train.py carves them at --split-seed."""
    return split_items("retrieval", examples, a.val_ratio, a.test_ratio, a.split_seed)


# ---- sentence-transformers' recipe, in its own process -----------------------------------------------------
def st_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="--st OPTS", allow_abbrev=False)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--negatives", type=int, default=0, help="hard negatives per (query, positive) pair")
    p.add_argument("--negatives-file", default="", help="a JSONL whose `neg` (by qid) replaces the data's")
    return p


def st_train(a: argparse.Namespace, opts: list[str], seed: int, out: Path) -> dict:
    """Fine-tune with SentenceTransformerTrainer + MultipleNegativesRankingLoss; save to `out`; the training time."""
    import random

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    o = st_parser().parse_args(opts)
    examples, _ = load_data(a)
    parts = fixed_split(examples, a)
    negs = {}
    if o.negatives_file:
        negs = {ex.qid: ex.neg for ex in load_examples(o.negatives_file)[0]}
    rows: dict[str, list[str]] = {"anchor": [], "positive": [], **{f"negative_{k}": [] for k in range(o.negatives)}}
    rng = random.Random(seed)
    for i in parts["train"] + parts["val"]:  # every labelled query that is not a test query
        ex = examples[i]
        pool = negs.get(ex.qid, ex.neg) if o.negatives_file else ex.neg
        for pos in ex.pos:
            if o.negatives and not pool:
                continue  # a hard-negative row needs negatives; the line has none
            rows["anchor"].append(ex.query)
            rows["positive"].append(pos)
            drawn = rng.sample(pool * -(-o.negatives // max(1, len(pool))), o.negatives) if o.negatives else []
            for k, n in enumerate(drawn):
                rows[f"negative_{k}"].append(n)
    folder = resolve_model(a.model)
    tok = Embedder.load(str(folder)).tokenizer  # the model's own instructions, as bge uses them
    prompts = {column: tok.query_prompt if column == "anchor" else tok.passage_prompt for column in rows}
    model = SentenceTransformer(str(folder), device="cpu")
    model.max_seq_length = a.max_length
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "st-output"), num_train_epochs=o.epochs, per_device_train_batch_size=o.batch_size,
        learning_rate=o.lr, warmup_ratio=o.warmup_ratio, batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed,
        data_seed=seed, save_strategy="no", report_to="none", logging_steps=10, use_cpu=True,
        prompts={c: p for c, p in prompts.items() if p} or None, dataloader_num_workers=0)
    loss = MultipleNegativesRankingLoss(model, scale=o.scale)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    model.save(str(out / "model"))
    return {"train_seconds": seconds, "pairs": len(rows["anchor"]), "steps": trainer.state.global_step}


# ---- one (recipe, seed) -------------------------------------------------------------------------------
def run_recipe(a: argparse.Namespace, kind: str, name: str, flags: str, seed: int, out: Path) -> dict:
    """Train one recipe at one seed in a fresh process; (model folder, training seconds, wall seconds)."""
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted attempt left (a finished one has its score.json)
    out.mkdir(parents=True)
    threads = ["--threads", str(a.threads)] if a.threads else []
    if kind == "bge":
        cmd = [sys.executable, str(REPO / "train.py"), "--data", a.data, "--model", a.model, "--split-seed",
               str(a.split_seed), "--seed", str(seed), "--val-ratio", str(a.val_ratio), "--test-ratio",
               str(a.test_ratio), "--out-dir", str(out), "--run-name", "run", "--cache-dir", str(a.out / "cache"),
               *threads, *shlex.split(flags)]
        if Path(a.data).is_dir():
            cmd += ["--split", a.split]
        elif a.corpus:
            cmd += ["--corpus", a.corpus]
    else:
        cmd = [sys.executable, __file__, "st-train", *sys.argv[1:], "--st-seed", str(seed), "--st-out", str(out),
               "--st-opts", flags]
    console.print(f"[bold]{name}[/] seed {seed}: {shlex.join(cmd)}")
    start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = (out / "log.txt").read_text(errors="replace").splitlines()[-5:]
        raise UserError(f"{name} seed {seed} failed ({out / 'log.txt'}):\n  " + "\n  ".join(tail))
    if kind == "bge":
        run = out / "run"
        results = json.loads((run / "results.json").read_text())
        model = run / "merged" if (run / "merged").exists() else run / "best"
        info = {"train_seconds": results["train_seconds"], "steps": results["steps"], "best_step": results.get("best_step")}
        split = json.loads((run / "split.json").read_text())
        info["test_ids"] = sorted(split["tasks"]["retrieval"]["test"])
    else:
        model = out / "model"
        info = json.loads((out / "train.json").read_text())
    return {**info, "model": str(model), "wall_seconds": wall}


def score(model: Embedder, test, probe, a) -> tuple[dict[str, float], dict[str, float]]:
    """Test metrics (and the probe's Spearman) of one model, by the same code and precision for every model, and
    each test query's nDCG@10 (for the paired comparisons)."""
    ev = evaluate_retrieval(model, test, ks=KS, batch_size=a.batch_size, max_length=a.max_length, cpu_bf16=a.bf16,
                            cache_dir=a.out / "cache", show_progress=False)
    s = {k: ev.metrics.summary[k] for k in ("ndcg@10", "mrr@10", "recall@10", "recall@100")}
    if probe is not None:
        s["probe_spearman"] = evaluate_sts(model, probe, batch_size=a.batch_size, max_length=a.max_length,
                                           cpu_bf16=a.bf16)["spearman"]
    return s, {q: m["ndcg@10"] for q, m in ev.metrics.per_query.items()}


def per_query_again(info: dict, test, a) -> dict[str, float] | None:
    """Each test query's nDCG@10 for a score.json written before they were kept: the saved model scored again (its
    corpus encoding is cached, so this costs the queries alone). None when the model folder is gone or the mean
    no longer matches the saved nDCG@10 (then the file is left as it was)."""
    if not Path(info["model"]).exists():
        return None
    _, per = score(Embedder.load(info["model"]), test, None, a)
    if abs(statistics.fmean(per.values()) - info["scores"]["ndcg@10"]) > 1e-6:
        console.print(f"[yellow]{info['model']}: scored again, nDCG@10 {statistics.fmean(per.values()):.6f} is not "
                      f"the saved {info['scores']['ndcg@10']:.6f}; no per-query scores kept[/]")
        return None
    return per


def paired_difference(a: list[float], b: list[float], resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """The mean of a - b over the same test queries and its 95% percentile-bootstrap interval (the queries drawn
    again with replacement): how far the difference could move had other test queries been carved. It covers the
    test set's sampling, not the training seeds' (each side is the mean over its seeds first; the table's sd is the
    seeds' spread). `share_better` is the share of queries where a scores higher."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "low": float(lo), "high": float(hi), "share_better": float((d > 0).mean()),
            "share_worse": float((d < 0).mean()), "queries": len(d)}


@contextlib.contextmanager
def attempt_lock(path: Path):
    """Hold one (recipe, seed) for this process: yields False when another quality.py (the same command run twice to
    use two lanes, or a second --bge against the same --out) holds it, whose folder must then not be cleared."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel drops it when the holder dies
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def spec_hash(a, kind: str, flags: str) -> str:
    """What a cached score depends on: the recipe, the data, the split and the model."""
    key = [kind, flags, a.data, a.split, a.corpus, a.model, a.split_seed, a.val_ratio, a.test_ratio, a.max_length]
    return hashlib.blake2b(json.dumps(key).encode(), digest_size=8).hexdigest()


class Recipe(argparse.Action):
    """--bge and --st append (kind, NAME=FLAGS) to one list, so recipes run in the order they are given."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.recipes = [*(getattr(namespace, "recipes", None) or []), (option_string.lstrip("-"), value)]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="bench", choices=("bench", "st-train"), help=argparse.SUPPRESS)
    p.add_argument("--data", required=True, help="BEIR folder or training JSONL")
    p.add_argument("--split", default="train", help="BEIR qrels split")
    p.add_argument("--corpus", default="", help="JSONL data: extra evaluation corpus (a BEIR folder or passages JSONL)")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--val-ratio", type=float, default=0.15)
    p.add_argument("--test-ratio", type=float, default=0.15)
    p.add_argument("--max-length", type=int, default=256, help="passage length, for training (ST) and scoring (all)")
    p.add_argument("--bge", action=Recipe, dest="recipes", metavar="NAME=FLAGS", help="a bge recipe: train.py flags")
    p.add_argument("--st", action=Recipe, dest="recipes", metavar="NAME=OPTS", help="a sentence-transformers recipe")
    p.add_argument("--vs", default="", metavar="NAME", help="the recipe every other is paired with, seed by seed "
                   "(e.g. 'bge default' for one-knob changes; default: the first --st recipe)")
    p.add_argument("--no-train", action="store_true", help="report the scores saved under --out; train nothing (a "
                   "(recipe, seed) without a score is left out)")
    p.add_argument("--probe", default="", help="a general STS TSV scored for every model (e.g. STS-B dev)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="scoring precision for every model (auto: bf16 on CPUs with native bf16)")
    p.add_argument("--batch-size", type=int, default=128, help="scoring batch size")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("checkpoints/quality"))
    p.add_argument("--st-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--st-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--st-opts", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.mode == "st-train":
        info = st_train(a, shlex.split(a.st_opts), a.st_seed, a.st_out)
        (a.st_out / "train.json").write_text(json.dumps(info) + "\n")
        return
    if not Path(a.data).exists():
        raise UserError(f"--data {a.data}: no such file or folder")
    a.bf16 = a.precision == "bf16" or (a.precision == "auto" and native_cpu_bf16())
    seeds = [int(s) for s in a.seeds.split(",")]
    recipes = []
    for kind, spec in a.recipes or [("bge", "default="), ("st", "default=")]:  # in the order given
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            raise UserError(f"--{kind} {spec!r}: expected NAME=FLAGS")
        if kind == "st":
            st_parser().parse_args(shlex.split(flags))  # a typo fails now, not after an hour
        recipes.append((kind, f"{kind} {name}", flags))
    if a.vs:  # 'bge default' or, where one kind has it, 'default'
        named = [n for _, n, _ in recipes if a.vs in (n, n.split(" ", 1)[1])]
        if len(named) != 1:
            raise UserError(f"--vs {a.vs!r}: {'names two recipes' if named else 'not a recipe of this command'} "
                            f"(its recipes: {', '.join(n for _, n, _ in recipes)})")
        a.vs = named[0]

    examples, full = load_data(a)
    parts = fixed_split(examples, a)
    test_ids = sorted(examples[i].qid for i in parts["test"])
    test = full.subset(test_ids)
    probe = load_sts(a.probe) if a.probe else None
    console.print(f"{a.data}: {len(parts['train'])} train, {len(parts['val'])} validation, {len(test.queries)} test "
                  f"queries; corpus {len(test.corpus)}; split seed {a.split_seed}; seeds {seeds}")
    a.out.mkdir(parents=True, exist_ok=True)

    base, base_per_query = score(Embedder.load(a.model), test, probe, a)
    rows = {"base": {"kind": "base", "seeds": {}, "scores": [base], "per_query": base_per_query}}
    rows |= {name: {"kind": kind, "flags": flags, "seeds": {}} for kind, name, flags in recipes}
    for seed in seeds:  # seed by seed: after the first, every recipe has a number
        for kind, name, flags in recipes:
            out = a.out / "runs" / name.replace(" ", "-") / f"seed{seed}"
            done = out / "score.json"
            h = spec_hash(a, kind, flags)
            out.parent.mkdir(parents=True, exist_ok=True)
            with attempt_lock(out.parent / f"{out.name}.lock") as mine:
                saved = json.loads(done.read_text()) if done.exists() else {}  # read under the lock
                if saved.get("spec") == h:
                    info = rows[name]["seeds"][seed] = saved
                    if mine and "per_query" not in info and (per := per_query_again(info, test, a)) is not None:
                        info["per_query"] = per  # kept from now on
                        atomic_write_text(done, json.dumps(info, indent=2) + "\n")
                    continue
                if not mine:
                    console.print(f"[yellow]{name} seed {seed}: another quality.py is running it; skipped here (a later "
                                  f"call with the same --out picks up its score)[/]")
                    continue
                if a.no_train:
                    console.print(f"[dim]{name} seed {seed}: no score saved; left out (--no-train)[/]")
                    continue
                info = run_recipe(a, kind, name, flags, seed, out)
                if kind == "bge" and info.pop("test_ids") != sorted(test_ids):
                    raise UserError(f"{name}: train.py carved another test set than the benchmark "
                                    f"(split seed {a.split_seed})")
                info["scores"], info["per_query"] = score(Embedder.load(info["model"]), test, probe, a)
                info["spec"] = h
                atomic_write_text(done, json.dumps(info, indent=2) + "\n")  # whole, for a process reading it
                rows[name]["seeds"][seed] = info
                console.print(f"  {name} seed {seed}: nDCG@10 {info['scores']['ndcg@10']:.4f} "
                              f"({info['train_seconds']:.0f} s training, {info['wall_seconds']:.0f} s wall)")
                report(a, rows, seeds, base, test, parts)
    report(a, rows, seeds, base, test, parts)


def seed_mean_per_query(r: dict, qids: list[str]) -> list[float] | None:
    """A row's nDCG@10 per test query, averaged over its seeds; None if a seed has no per-query scores."""
    runs = [r] if r["kind"] == "base" else list(r["seeds"].values())
    if not runs or any(set(x.get("per_query") or ()) != set(qids) for x in runs):
        return None
    return [statistics.fmean(x["per_query"][q] for x in runs) for q in qids]


def versus(r: dict, other: dict, qids: list[str]) -> dict | None:
    """r against other on the seeds both ran, query by query: each seed's paired difference, and the pooled one of
    the per-query scores averaged over those seeds. For two bge recipes one seed means the same sampler order and
    dropout draws on both sides, so a knob is compared with the run it changed, not with another seed's luck (the
    seeds move SciFact's test by more than most knobs do). None until a common seed has every query's score."""
    complete = lambda run: set(run.get("per_query") or ()) == set(qids)
    seeds = [s for s in sorted(set(r["seeds"]) & set(other["seeds"]))
             if complete(r["seeds"][s]) and complete(other["seeds"][s])]
    if not seeds:
        return None
    side = lambda x: [statistics.fmean(x["seeds"][s]["per_query"][q] for s in seeds) for q in qids]
    each = {s: paired_difference([r["seeds"][s]["per_query"][q] for q in qids],
                                 [other["seeds"][s]["per_query"][q] for q in qids]) for s in seeds}
    return {**paired_difference(side(r), side(other)), "seeds": seeds,
            "per_seed": {s: {k: d[k] for k in ("mean", "low", "high")} for s, d in each.items()}}


def report(a, rows: dict, seeds: list[int], base: dict, test, parts) -> None:
    """The table (mean ± sd, every seed, change from base and from --vs (the first sentence-transformers recipe
    unless named) with a paired 95% interval over the test queries, times) and OUT/quality.json."""
    qids = sorted(rows["base"]["per_query"])  # the scored test queries (those with a relevant passage)
    per_query = {name: seed_mean_per_query(r, qids) for name, r in rows.items()}
    peer = a.vs or next((n for n, r in rows.items() if r["kind"] == "st" and per_query[n]), None)
    columns = ["recipe", "nDCG@10 mean ± sd", "per seed", "vs base [95% CI]",
               *([f"vs {peer} [95% CI]", f"vs {peer} per seed"] if peer else []), "R@100", "probe", "train s", "wall s"]
    table, summary = [], {}
    for name, r in rows.items():
        per = [s["scores"] for s in r["seeds"].values()] or r.get("scores", [])
        if not per:
            continue
        nd = [s["ndcg@10"] for s in per]
        m, sd = mean_sd(nd)
        train = [s["train_seconds"] for s in r["seeds"].values()]
        wall = [s["wall_seconds"] for s in r["seeds"].values()]
        summary[name] = {"kind": r["kind"], "flags": r.get("flags"), "ndcg@10": {"mean": m, "sd": sd, "per_seed": nd},
                         **{k: mean_sd([s[k] for s in per])[0] for k in per[0] if k != "ndcg@10"},
                         "train_seconds": statistics.median(train) if train else None,
                         "wall_seconds": statistics.median(wall) if wall else None, "runs": r["seeds"]}
        cells = ["", "", ""]
        if name != "base" and per_query[name] is not None:  # the base model has no seeds: every seed against it
            d = summary[name]["vs base"] = paired_difference(per_query[name], per_query["base"])
            cells[0] = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
        elif name != "base":  # no per-query scores (yet): the plain difference of means
            cells[0] = f"{m - base['ndcg@10']:+.4f}"
        if peer and name not in (peer, "base") and (d := versus(r, rows[peer], qids)) is not None:
            summary[name][f"vs {peer}"] = d
            only = "" if d["seeds"] == sorted(r["seeds"]) else f" (seed{'s' * (len(d['seeds']) > 1)} " \
                f"{','.join(map(str, d['seeds']))})"
            cells[1] = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{only}"
            cells[2] = " ".join(f"{x['mean']:+.3f}" for x in d["per_seed"].values())
        probe = f"{summary[name]['probe_spearman']:.4f}" if "probe_spearman" in per[0] else "-"
        table.append([name, f"{m:.4f} ± {sd:.4f}", " ".join(f"{x:.4f}" for x in nd), *cells[:3 if peer else 1],
                      f"{summary[name]['recall@100']:.4f}", probe,
                      f"{summary[name]['train_seconds']:.0f}" if train else "",
                      f"{summary[name]['wall_seconds']:.0f}" if wall else ""])
    title = (f"{a.data}: {len(test.queries)} test queries of {len(parts['train']) + len(parts['val']) + len(test.queries)}"
             f", corpus {len(test.corpus)}, seeds {','.join(map(str, seeds))}; times are medians; CI: paired "
             f"bootstrap over test queries")
    print_table(title, columns, table)
    write_json(str(a.out / "quality.json"), {"data": a.data, "model": a.model, "split_seed": a.split_seed,
                                             "test_queries": len(test.queries), "seeds": seeds,
                                             "precision": "bf16" if a.bf16 else "fp32", "recipes": summary})


if __name__ == "__main__":
    run_cli(main)
