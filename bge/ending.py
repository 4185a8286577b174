"""The ending of a run, after its last step: the forgetting guard (base and fine-tuned weights mixed, LM-Cocktail,
the mix chosen on validation: bge/merge.py), then base vs fine-tuned (and the mix) on each task's held-out test set
and the general probe, the diagnostics that explain the change, results.json, the model cards' tables and the
curves. bge.training.train calls `finish` on rank 0.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
from rich.table import Table

from bge import card, diagnostics, merge, plot
from bge.checkpoint import atomic_write_text, json_text
from bge.config import TrainConfig
from bge.console import console
from bge.data import RetrievalData, STSData
from bge.embedder import Embedder
from bge.runs import Stopwatch
from bge.tasks import Task, export, labelled, metric_label, missing_sets, probe_scores


def results_table(title: str, base: dict, tuned: dict, metrics: tuple[str, ...], merged: dict | None = None,
                  ratio: float | None = None) -> Table:
    """Metrics as rows; base, fine-tuned (and the base/fine-tuned mix) as columns, with changes from base."""
    table = Table(title=title)
    columns = ["metric", "base", "fine-tuned", "change"] + ([f"merged {ratio:g}", "change"] if merged else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "metric" else "right")

    def change(d: float) -> str:
        style = "green" if d > 0 else "red" if d < 0 else ""
        return f"[{style}]{d:+.4f}[/]" if style else f"{d:+.4f}"

    for m in metrics:
        if math.isnan(base[m]):  # a metric the base model has not got (a trained classification head)
            table.add_row(m, "-", f"{tuned[m]:.4f}", "", *([f"{merged[m]:.4f}", ""] if merged else []))
            continue
        cells = [f"{base[m]:.4f}", f"{tuned[m]:.4f}", change(tuned[m] - base[m])]
        if merged:
            cells += [f"{merged[m]:.4f}", change(merged[m] - base[m])]
        table.add_row(m, *cells)
    return table


def forgetting_guard(cfg: TrainConfig, tasks: dict[str, Task], run_dir: Path, base: Embedder, tuned: Embedder,
                     trainer: dict, score: Callable[[Embedder], dict[str, float]],
                     clock: Stopwatch) -> tuple[Embedder | None, float | None, dict[float, dict[str, float]]]:
    """(the mix exported to merged/, its ratio, the sweep's validation scores by ratio): --merge-sweep's choice
    (bge.merge.sweep; the ends come from the validations of training), or --merge-ratio's fixed mix, or none."""
    ratio, sweep = (cfg.merge_ratio if cfg.merge_ratio >= 0 else None), {}
    if cfg.merge_sweep:
        ratio, sweep = merge.sweep(base, tuned, merge.parse_ratios(cfg.merge_sweep), score,
                                   {0.0: trainer["base_val"], 1.0: trainer["best_val"]}, cfg.probe_tolerance,
                                   metric_label(tasks))
    if ratio is None:
        return None, None, sweep
    merged = merge.merged_embedder(base, tuned, ratio)
    with clock("export"):
        export(merged, tasks, run_dir / "merged")
    return merged, ratio, sweep


def finish(cfg: TrainConfig, tasks: dict[str, Task], run_dir: Path, trainer: dict, *, device: torch.device,
           cpu_bf16: bool, probe: RetrievalData | STSData | None, clock: Stopwatch,
           score: Callable[[Embedder], dict[str, float]]) -> dict:
    """Test the base model (with its own instructions), best/ and the guard's mix; print the diagnostics and
    the tables; write results.json (returned), the cards' tables and the curves. `score` validates a model (val/ and
    probe/ metrics)."""
    judged = labelled(tasks)  # what is validated and reported: not --unlabeled's pseudo-pairs
    first = next(iter(judged.values()))
    best_key = first.metric if len(judged) == 1 else "mean"
    results = {"run": str(run_dir), "config": cfg.to_dict(), "best_step": trainer["best_step"], f"best_val_{best_key}": trainer["best"],
               "steps": trainer["step"], "train_seconds": trainer["train_seconds"], "skipped_steps": trainer["bad_steps_total"],
               **{f"train_{'queries' if t.name == 'retrieval' else t.name}": len(t.train) for t in tasks.values()}}
    # the base as it is used without this run, with its own instructions: a --query-prompt or --passage-prompt the
    # model was not trained with is part of what fine-tuning changed (BGE's query instruction given to
    # all-MiniLM-L6-v2 costs SciFact 5 nDCG@10)
    tuned = Embedder.load(str(run_dir / "best"), device=device)  # its folder holds the run's instructions
    base = Embedder.load(cfg.model, device=device)
    for side in ("query", "passage"):
        own, runs = getattr(base.tokenizer, f"{side}_prompt"), getattr(tuned.tokenizer, f"{side}_prompt")
        if own != runs:
            console.print(f"the base model is tested with its own {side} instruction ({own!r}), the fine-tuned one "
                          f"with this run's ({runs!r})")
            results[f"base_{side}_prompt"] = own
    merged, ratio, sweep = forgetting_guard(cfg, tasks, run_dir, base, tuned, trainer, score, clock)
    if sweep:
        results["merge_sweep"] = {f"{r:g}": s for r, s in sorted(sweep.items())}
    if ratio is not None:
        results["merge_ratio"] = ratio

    # the probe was scored when each of these models was validated (base at step 0, best/ at its step): reuse it
    validated = {"base": trainer["base_val"],
                 "fine_tuned": trainer["best_val"], "merged": sweep.get(ratio)}
    probe_rows = {name: {k: v for k, v in (validated[name] or {}).items() if k.startswith("probe/")}
                  or probe_scores(m, probe, cfg, cpu_bf16)
                  for name, m in (("base", base), ("fine_tuned", tuned), ("merged", merged)) if m}
    per_task, tables = {}, []  # the base-vs-fine-tuned tables come last, after the diagnostics that explain them
    for job in (t for t in tasks.values() if t.test_data is not None):
        r = job.test(base, tuned, cpu_bf16, run_dir / "best")
        b, t = r.base | probe_rows["base"], r.fine_tuned | probe_rows["fine_tuned"]
        m = job.test_scores(merged, cpu_bf16, run_dir / "merged") | probe_rows["merged"] if merged else None
        tables.append(results_table(f"{job.name} · {r.title}", b, t, (*job.table_metrics, *probe_rows["base"]), m, ratio))
        per_task[job.name] = {**r.counts, "base": b, "fine_tuned": t, "change": {k: t[k] - b[k] for k in b}}
        if m is not None:
            per_task[job.name].update(merged=m, merged_change={k: m[k] - b[k] for k in b})
        if r.comparison is not None:  # why it changed: wins and losses, score scales, a threshold for each
            console.rule("diagnostics: base vs fine-tuned on the held-out test queries")
            for renderable in diagnostics.render(r.comparison, job.test_data.corpus):
                console.print(renderable)
            png = diagnostics.plot_score_distributions(r.comparison.scores, run_dir / "scores.png", r.comparison.thresholds)
            if png:
                console.print(f"score distributions plotted in {png}")
            per_task[job.name]["diagnostics"] = r.comparison.to_dict()
    for table in tables:
        console.print(table)
    no_test = {task: why for task, part, why in missing_sets(judged, cfg) if part == "test"}
    if no_test:  # said in results.json too, so that a missing table is not read as a lost one
        results["no_test_set"] = no_test
    if per_task:
        results.update(per_task[first.name] if len(judged) == 1 else {"tasks": per_task})
    elif probe is not None:  # no test set: the probe alone
        console.print(results_table(f"general probe · {probe.name}", probe_rows["base"], probe_rows["fine_tuned"],
                                    tuple(probe_rows["base"]), probe_rows.get("merged"), ratio))
        results.update(probe_rows)
    results["timing"] = clock.report()  # seconds by phase (this process), peak RSS: benchmarks/run_time.py
    text = json_text(results) + "\n"  # NaN as null, with why
    atomic_write_text(run_dir / "results.json", text)
    # from here on the results are what the file says, so train()'s caller and a script reading results.json see
    # one thing (JSON's lists for tuples, null for NaN), whatever shape a later field is built in
    results = json.loads(text)
    card.fill_results(run_dir, results)  # the test table into best/'s and merged/'s model cards
    plot.after_run(run_dir)  # curves.png, or text sparklines without matplotlib
    console.print(f"wrote {run_dir / 'results.json'}; fine-tuned model in {run_dir / 'best'}")
    return results
