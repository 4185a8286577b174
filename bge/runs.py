"""Run folders side by side: one row per run with the settings that differ between the runs, the held-out test
metrics of `best/`, its parameter count, the training time and its encoding speed; shown as a rich table and
written as CSV, markdown and JSON, with the quality/speed trade-off plotted (`pareto.png`, the Pareto front marked;
when matplotlib is installed). sweep.py and `evaluate.py --compare` both build their tables here.

Encoding speed is measured, not read from the run: Embedder.encode on a fixed set of real passages (the first
`n` SciFact documents of 150-250 words by default), same batch size and thread count for every run, and the same
max length (--speed-max-length N), or each run's own --max-passage-length, the length its test metrics were measured
at (0, the default: a run trained and tested at 128 tokens is timed at 128), median of `repeats` timed passes after
one warm-up batch. The result is kept in the run folder (`speed.json`, keyed by those settings and the machine), so
a second table re-measures nothing.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.table import Table

from bge.checkpoint import atomic_write_text
from bge.config import Bounded
from bge.console import progress
from bge.embedder import Embedder
from bge.errors import UserError

# ../shared/data beside the checkout, or $BGE_SCIFACT (as benchmarks/common.py)
SCIFACT = Path(os.environ.get("BGE_SCIFACT") or Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact")
METRICS = (("ndcg@10", "nDCG@10"), ("mrr@10", "MRR@10"), ("recall@10", "R@10"), ("recall@100", "R@100"))
# settings that say where or how a run was executed, not what was trained: never a column
BOOKKEEPING = {"out_dir", "cache_dir", "run_name", "resume", "device", "eval_batch_size", "threads", "eval_every",
               "save_every", "log_every"}
SPEED_FILE = "speed.json"


# ---- a run's wall time by phase --------------------------------------------------------------------------
class Stopwatch:
    """A process's wall time by phase, for results.json's `timing` (benchmarks/run_time.py prints it). `enter(name)`
    sets the phase that time goes to from now on; `with clock(name):` lends the time to another phase and then
    returns to the one before, so a validation inside training counts as validation only, and no second twice."""

    def __init__(self, phase: str = "setup"):
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack = [phase]
        self._start = self._mark = time.perf_counter()
        self.peak_rss = peak_rss()  # bytes; the kernel's high-water mark only rises, so the phase that was running
        self.peak_phase = phase     # when it last rose is the one that set the run's peak

    def _charge(self) -> None:
        now = time.perf_counter()
        self.seconds[self._stack[-1]] += now - self._mark
        self._mark = now
        if (rss := peak_rss()) > self.peak_rss:
            self.peak_rss, self.peak_phase = rss, self._stack[-1]

    def enter(self, phase: str) -> None:
        self._charge()
        self._stack[-1] = phase

    @contextmanager
    def __call__(self, phase: str):
        self._charge()
        self._stack.append(phase)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def report(self) -> dict[str, float | str]:
        """Seconds by phase, `total` (since the stopwatch started), the process's peak RSS in GB so far and the
        phase it was reached in (`peak_rss_phase`: which part of a run to make smaller)."""
        self._charge()
        return {**{k: round(v, 3) for k, v in self.seconds.items()}, "total": round(self._mark - self._start, 3),
                "peak_rss_gb": round(self.peak_rss / 1e9, 3), "peak_rss_phase": self.peak_phase}


def peak_rss() -> int:
    """This process's peak resident set size in bytes so far (ru_maxrss: kilobytes on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


# ---- the machine and the passages encoding speed is measured on -----------------------------------------
def machine() -> str:
    """CPU model (or GPU name), core count and torch version."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} · torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} · {os.cpu_count()} cores · {torch.get_num_threads()} threads · torch {torch.__version__}"


def speed_passages(corpus: str | Path = SCIFACT, n: int = 256, words: tuple[int, int] = (150, 250)) -> list[str]:
    """The first n documents (title + ' ' + text) of a BEIR corpus.jsonl whose length falls in the word range."""
    path = Path(corpus) / "corpus.jsonl"
    if not path.exists():
        raise UserError(f"{path}: not found; pass a BEIR folder for the encoding-speed passages, or skip the speed")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            text = (d.get("title", "") + " " + d["text"]).strip()
            if words[0] <= len(text.split()) <= words[1]:
                out.append(text)
                if len(out) == n:
                    return out
    raise UserError(f"{path}: only {len(out)} passages of {words[0]}-{words[1]} words, {n} wanted")


@dataclass(frozen=True)
class SpeedSettings:
    """How encoding speed is measured; part of the key of a run's speed.json."""

    n: int = 256
    batch_size: int = 32
    max_length: int = 256  # 0 = each run's own --max-passage-length (run_row)
    threads: int = 0  # 0 = torch's default
    repeats: int = 3


def measure_speed(embedder: Embedder, texts: list[str], s: SpeedSettings) -> list[float]:
    """Passages/s of each of `s.repeats` timed passes over texts (after one untimed warm-up batch)."""
    before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        kw = dict(batch_size=s.batch_size, max_length=s.max_length, show_progress=False)
        embedder.encode(texts[: s.batch_size], **kw)
        rates = []
        for _ in range(s.repeats):
            start = time.perf_counter()
            embedder.encode(texts, **kw)
            rates.append(len(texts) / (time.perf_counter() - start))
        return rates
    finally:
        torch.set_num_threads(before)


def cached_speed(run: Path, embedder: Embedder, texts: list[str], s: SpeedSettings) -> float:
    """The median passages/s of the run's best/ model, from speed.json when measured alike on this machine."""
    key = {**asdict(s), "texts": hashlib.blake2b("\0".join(texts).encode(), digest_size=8).hexdigest(),
           "machine": machine(), "model": embedder.fingerprint()}
    path = run / SPEED_FILE
    try:
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            return saved["median"]
    except (OSError, ValueError, KeyError):
        pass
    rates = measure_speed(embedder, texts, s)
    atomic_write_text(path, json.dumps({"key": key, "median": statistics.median(rates), "runs": rates}, indent=1) + "\n")
    return statistics.median(rates)


# ---- rows -------------------------------------------------------------------------------------------------
def is_run(folder: Path) -> bool:
    """A finished train.py run folder: it has results.json and best/."""
    return (folder / "results.json").exists() and (folder / "best").is_dir()


def as_run(folder: Path) -> Path:
    """The run folder, also when given its best/ (whose numbers the table shows): rows are named by run."""
    return folder.parent if folder.name == "best" and is_run(folder.parent) else folder


def model_label(name: str) -> str:
    """A short label for a model: a folder's last part, or `<run>/best` for an export folder inside a run folder
    (best/, final/, merged/ of every run would otherwise all read alike)."""
    path = Path(name)
    if path.name in ("best", "final", "merged") and (path.parent / "config.json").is_file():
        return f"{path.parent.name}/{path.name}"
    return path.name or name


def run_row(folder: Path, *, speed_texts: list[str] | None, speed: SpeedSettings = SpeedSettings()) -> dict:
    """One run's numbers: config, test metrics of best/, parameters, training time, passages/s (None: not measured)."""
    results = json.loads((folder / "results.json").read_text())
    speed = replace(speed, max_length=speed.max_length or results.get("config", {}).get("max_passage_length", 256))
    embedder = Embedder.load(str(folder / "best"))
    params = sum(p.numel() for p in embedder.model.parameters())
    embedding = sum(p.numel() for p in embedder.model.emb.parameters())
    return {"run": folder.name, "folder": str(folder), "config": results.get("config", {}),
            "test": results.get("fine_tuned"), "base": results.get("base"), "test_queries": results.get("test_queries"),
            "best_step": results.get("best_step"), "steps": results.get("steps"),
            "train_seconds": results.get("train_seconds", 0.0), "params": params, "params_no_emb": params - embedding,
            "passages_per_s": cached_speed(folder, embedder, speed_texts, speed) if speed_texts else None,
            "speed_max_length": speed.max_length if speed_texts else None}


def differing_settings(rows: list[dict]) -> list[str]:
    """The config fields whose values are not the same in every row (bookkeeping fields aside), in config order."""
    keys = list(dict.fromkeys(k for r in rows for k in r["config"]))
    return [k for k in keys if k not in BOOKKEEPING and len({json.dumps(r["config"].get(k)) for r in rows}) > 1]


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Whether each (quality, speed) point is on the Pareto front: no other point is at least as good on both and
    better on one. Points of equal speed are taken together, fastest first: a point is on the front when it is the
    best of its speed and better than every faster point."""
    front = [False] * len(points)
    best_faster = float("-inf")
    for speed in sorted({s for _, s in points}, reverse=True):
        same = [i for i, (_, s) in enumerate(points) if s == speed]
        top = max(points[i][0] for i in same)
        for i in same:
            front[i] = points[i][0] == top and top > best_faster
        best_faster = max(best_faster, top)
    return front


def trade_off(rows: list[dict], metric: str = "ndcg@10") -> list[bool | None]:
    """Per row: on the quality/speed Pareto front (test `metric` against passages/s), or None without both."""
    have = [i for i, r in enumerate(rows) if r["passages_per_s"] and (r["test"] or {}).get(metric) is not None]
    front = pareto_front([(rows[i]["test"][metric], rows[i]["passages_per_s"]) for i in have])
    out: list[bool | None] = [None] * len(rows)
    for i, on in zip(have, front):
        out[i] = on
    return out


def table_cells(rows: list[dict], settings: list[str]) -> tuple[list[str], list[list[str]], list[list]]:
    """(headers, display strings per row, raw values per row) for the table."""
    headers = ["run", *settings, *(h for _, h in METRICS), "params", "params w/o emb.", "train time", "passages/s",
               "Pareto"]
    shown, raw = [], []
    for r, front in zip(rows, trade_off(rows)):
        test = r["test"] or {}
        values = [r["run"], *(r["config"].get(k) for k in settings), *(test.get(m) for m, _ in METRICS),
                  r["params"], r["params_no_emb"], r["train_seconds"], r["passages_per_s"], front]
        raw.append(values)
        fmt = [str, *([str] * len(settings)), *([lambda v: f"{v:.4f}"] * len(METRICS)), _count, _count,
               _duration, lambda v: f"{v:.1f}", lambda v: "front" if v else ""]
        shown.append(["–" if v is None else f(v) for f, v in zip(fmt, values)])
    return headers, shown, raw


def rich_table(title: str, headers: list[str], shown: list[list[str]], caption: str = "") -> Table:
    table = Table(title=title, caption=caption)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in shown:
        table.add_row(*row)
    return table


def markdown(headers: list[str], shown: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in shown]
    return "\n".join(lines) + "\n"


def write_tables(prefix: Path, title: str, rows: list[dict], caption: str) -> Table:
    """Write {prefix}.csv (raw numbers), {prefix}.md and {prefix}.json (every row in full); return the rich table."""
    headers, shown, raw = table_cells(rows, differing_settings(rows))  # raw: numbers as they are, for the CSV
    prefix.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    settings = differing_settings(rows)
    names = ["run", *settings, *(m for m, _ in METRICS), "params", "params_no_emb", "train_seconds", "passages_per_s",
             "pareto"]
    csv.writer(buf, lineterminator="\n").writerows([names, *raw])
    atomic_write_text(prefix.with_suffix(".csv"), buf.getvalue())
    atomic_write_text(prefix.with_suffix(".md"), f"{title}\n\n{markdown(headers, shown)}\n{caption}\n")
    atomic_write_text(prefix.with_suffix(".json"), json.dumps({"title": title, "caption": caption, "rows": rows},
                                                              indent=2) + "\n")
    return rich_table(title, headers, shown, caption)


def pareto_path(prefix: Path) -> Path:
    """The plot beside a table: pareto.png for the default stem `results`, else <stem>-pareto.png."""
    return prefix.parent / ("pareto.png" if prefix.name == "results" else f"{prefix.name}-pareto.png")


def plot_pareto(rows: list[dict], path: Path, title: str, metric: str = "ndcg@10") -> Path | None:
    """Test `metric` against passages/s (log scale), one labelled point per run, the Pareto front joined and
    marked. Needs matplotlib, which bge does not require: returns None when it is not installed or no run has
    both numbers."""
    front = trade_off(rows, metric)
    shown = [(r, on) for r, on in zip(rows, front) if on is not None]
    if not shown:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r, on in shown:
        x, y = r["passages_per_s"], r["test"][metric]
        ax.scatter([x], [y], s=40, color="tab:red" if on else "tab:gray", zorder=3)
        ax.annotate(r["run"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    edge = sorted((r["passages_per_s"], r["test"][metric]) for r, on in shown if on)
    # the edge of what the front dominates: from each point down and left to the next slower one's height
    ax.step([x for x, _ in edge], [y for _, y in edge], where="pre", color="tab:red", label="Pareto front")
    ax.set_xscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 30, not 3 x 10^1
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("encoding speed, passages/s (log scale)")
    ax.set_ylabel(f"test {dict(METRICS).get(metric, metric)}")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def caption(rows: list[dict], speed: SpeedSettings | None, corpus: str | Path = SCIFACT) -> str:
    """What the numbers are: test metrics of best/, train time without validation, how speed was measured."""
    queries = sorted({r["test_queries"] for r in rows if r["test_queries"]})
    parts = [f"held-out test ({'/'.join(map(str, queries)) or '?'} queries), best/ of each run",
             "train time: optimiser steps only, validation excluded"]
    if speed:
        threads = speed.threads or torch.get_num_threads()
        length = speed.max_length or "each run's --max-passage-length"
        parts.append(f"passages/s: {speed.n} {Path(corpus).name} passages, batch {speed.batch_size}, max length "
                     f"{length}, {threads} thread{'s' if threads > 1 else ''}, median of {speed.repeats}")
        parts.append("Pareto: no other run has a higher test nDCG@10 at the same or higher speed")
    return " · ".join(parts) + f" · {machine()}"


# ---- the command-line side, shared by sweep.py and evaluate.py --compare ----------------------------------
def add_table_args(p: argparse.ArgumentParser) -> None:
    """The flags that say how the results table measures encoding speed."""
    g = p.add_argument_group("results table")
    g.add_argument("--speed-corpus", default=str(SCIFACT), help="BEIR folder whose passages (150-250 words) "
                   "encoding speed is measured on (default: the shared SciFact)")
    g.add_argument("--speed-n", type=Bounded(int, "[1, inf)"), default=SpeedSettings.n, help="passages per timed pass")
    g.add_argument("--speed-threads", type=Bounded(int, "[0, inf)"), default=0,
                   help="CPU threads while measuring (0 = torch's default)")
    g.add_argument("--speed-max-length", type=Bounded(int, "[0, inf)"), default=0, help="token length the passages "
                   "are cut to while measuring (0 = each run's own --max-passage-length, the length it was tested at)")
    g.add_argument("--no-speed", action="store_true", help="leave the passages/s column empty")


def report(folders: list[Path], prefix: Path, title: str, a: argparse.Namespace) -> tuple[Table, Path | None]:
    """Rows for the run folders (measuring speed where not cached), written to {prefix}.csv/.md/.json; the table and
    the Pareto plot (pareto_path; None when not drawn)."""
    if a.speed_max_length < 0:
        raise UserError(f"--speed-max-length must be 0 or more, got {a.speed_max_length}")
    speed = None if a.no_speed else SpeedSettings(n=a.speed_n, threads=a.speed_threads, max_length=a.speed_max_length)
    texts = speed_passages(a.speed_corpus, speed.n) if speed else None
    rows = []
    with progress(transient=True) as bar:
        task = bar.add_task("reading runs" + ("" if a.no_speed else ", measuring encoding speed"), total=len(folders))
        for folder in folders:
            rows.append(run_row(folder, speed_texts=texts, speed=speed or SpeedSettings()))
            bar.advance(task)
    table = write_tables(prefix, title, rows, caption(rows, speed, a.speed_corpus))
    return table, plot_pareto(rows, pareto_path(prefix), title)

