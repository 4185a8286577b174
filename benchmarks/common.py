"""Shared pieces of the benchmarks: real passages, timing statistics, the machine, and the results table."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.table import Table

from bge.console import console
from bge.errors import UserError
from bge.tokenizer import PAD_TO_MULTIPLE
from bge.runs import machine, speed_passages  # noqa: F401  (machine: the benchmarks' captions use it from here)

# where SciFact lives: ../shared/data beside the checkout, or $BGE_SCIFACT (a device machine gets a carried copy)
SCIFACT = Path(os.environ.get("BGE_SCIFACT") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scifact")


def scifact_passages(n: int, words: tuple[int, int] = (150, 250), path: Path = SCIFACT) -> list[str]:
    """The first n SciFact documents (title + ' ' + text) whose length falls in the word range."""
    try:
        return speed_passages(path, n, words)
    except UserError as e:
        raise SystemExit(str(e)) from None


def padding_costs(batches: list[dict[str, list[list[int]]]]) -> tuple[float, float]:
    """(padding share of padded tokens, padded attention L^2 / real L^2) over every side of every batch."""
    real = padded = att_real = att_padded = 0
    for b in batches:
        for side in b.values():
            longest = -(-max(len(x) for x in side) // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE  # as Tokenizer.pad pads
            real += sum(len(x) for x in side)
            padded += len(side) * longest
            att_real += sum(len(x) ** 2 for x in side)
            att_padded += len(side) * longest**2
    return 1 - real / padded, att_padded / att_real


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def rate(work: float, times: list[float]) -> dict:
    """work/s as median, min and max over the timed runs."""
    rates = sorted(work / t for t in times)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1], "runs": len(rates)}


def fmt(r: dict) -> str:
    return f"{r['median']:.1f} ({r['min']:.1f}–{r['max']:.1f})"


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title, caption=machine())
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        table.add_row(*r)
    console.print(table)  # in a log file or a pipe at bge.console.LOG_WIDTH columns, so its numbers stay whole


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
        console.print(f"wrote {path}")
