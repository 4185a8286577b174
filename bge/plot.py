"""Training curves from a run folder's metrics.jsonl: loss, learning rate, in-batch accuracy, and each validation
metric of the ending's table and each probe metric, by step.

    python -m bge.plot checkpoints/<run>                          # writes checkpoints/<run>/curves.png
    python -m bge.plot checkpoints/sweeps/scifact/* --out sweep.png   # several runs overlaid

train.py ends with `after_run`: curves.png when matplotlib is installed (bge does not require it), else a text
sparkline of the loss and the validation score, so the shape is visible in a terminal.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bge.console import console, run_cli
from bge.errors import UserError
from bge.tasks import TASK_TYPES

TRAINING = (("loss", "loss"), ("lr", "learning rate"), ("acc", "in-batch accuracy"))
BARS = "▁▂▃▄▅▆▇█"


def read_metrics(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(training-step lines, validation lines) of a run's metrics.jsonl."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run}: no metrics.jsonl; pass a train.py run folder")
    lines = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            lines.append(json.loads(line))
        except ValueError:
            raise UserError(f"{path}:{i}: not a JSON line") from None
    return [l for l in lines if "loss" in l], [l for l in lines if any(k.startswith(("val/", "probe/")) for k in l)]


def validation_keys(validations: list[dict]) -> list[str]:
    """The validation series worth a panel: the metrics of the ending's table (per task), the score that chooses best/
    when there are several tasks, every probe metric; in first-seen order."""
    headline = {m for t in TASK_TYPES.values() for m in t.table_metrics}
    keys = list(dict.fromkeys(k for v in validations for k in v if k != "step"))
    several = any(k.count("/") > 1 for k in keys if k.startswith("val/"))  # val/<task>/<metric>
    return [k for k in keys if k.startswith("probe/") or (k == "val/score" and several)
            or (k.startswith("val/") and k.rsplit("/", 1)[1] in headline)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with TensorBoard's bias correction (the first values are not pulled to 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def plot_runs(runs: list[Path], out: Path) -> Path | None:
    """One PNG of every run's curves (overlaid, one colour per run); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    data = [(Path(r), *read_metrics(r)) for r in runs]
    val_keys = list(dict.fromkeys(k for _, _, v in data for k in validation_keys(v)))
    panels = [*TRAINING, *((k, k) for k in val_keys)]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, steps, validations) in enumerate(data):
        colour = colours[i % len(colours)]
        label = run.name if len(data) > 1 else None
        for ax, (key, _) in zip(axes.flat, panels):
            source = steps if key in dict(TRAINING) else validations
            points = [(l["step"], l[key]) for l in source if isinstance(l.get(key), (int, float))]
            if not points:
                continue
            x, y = zip(*points)
            if key == "loss" and len(y) > 10:  # the raw loss is noisy: faint, with its moving average on top
                ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(x, smooth(list(y)), color=colour, linewidth=1.5, label=label)
            else:
                ax.plot(x, y, color=colour, linewidth=1.5, marker="o" if source is validations else None,
                        markersize=3, label=label if key == "loss" else None)
    for ax, (_, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(data) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(", ".join(r.name for r, _, _ in data) if len(data) <= 3 else f"{len(data)} runs", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def sparkline(values: list[float], width: int = 40) -> str:
    """`values` as one line of block characters, averaged down to at most `width` buckets."""
    if not values:
        return ""
    n = min(width, len(values))
    buckets = [values[i * len(values) // n:(i + 1) * len(values) // n] for i in range(n)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    return "".join(BARS[0 if hi == lo else round((m - lo) / (hi - lo) * (len(BARS) - 1))] for m in means)


def text_curves(run: str | Path) -> list[str]:
    """Sparklines of the training loss and of each validation series, with first, last and best values."""
    steps, validations = read_metrics(run)
    lines = []
    losses = [l["loss"] for l in steps if isinstance(l.get("loss"), (int, float)) and l["loss"] == l["loss"]]
    if losses:
        lines.append(f"{'loss':<18} {sparkline(losses)}  {losses[0]:.4f} → {losses[-1]:.4f} "
                     f"(steps {steps[0]['step']}-{steps[-1]['step']})")
    points = [(v["step"], v["val/score"]) for v in validations if isinstance(v.get("val/score"), (int, float))]
    if points:  # val/score: what chooses best/ (the task's metric, or the mean of the tasks')
        best = max(points, key=lambda p: p[1])
        lines.append(f"{'validation score':<18} {sparkline([p[1] for p in points])}  {points[0][1]:.4f} → "
                     f"{points[-1][1]:.4f} (best {best[1]:.4f} at step {best[0]})")
    return lines


def after_run(run_dir: Path) -> Path | None:
    """The end of train.py: curves.png in the run folder, or without matplotlib the text curves on the console."""
    png = plot_runs([run_dir], run_dir / "curves.png")
    if png:
        console.print(f"training curves in {png}", markup=False, highlight=False)
        return png
    for line in text_curves(run_dir):
        console.print(line, markup=False, highlight=False)
    console.print("(pip install matplotlib for curves.png)", markup=False, highlight=False)
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Plot training curves of train.py runs (overlaid when several).",
                                allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: <run>/curves.png for one run, curves.png for several)")
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs]
    for r in runs:
        read_metrics(r)  # a folder without metrics fails before anything is drawn
    out = Path(a.out) if a.out else runs[0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    png = plot_runs(runs, out)
    if png is None:
        for r in runs:
            console.print(f"{r.name}:", markup=False, highlight=False)
            for line in text_curves(r):
                console.print("  " + line, markup=False, highlight=False)
        raise UserError("no PNG written: python -m bge.plot needs matplotlib (pip install matplotlib); text curves "
                        "above")
    console.print(f"wrote {png}", markup=False, highlight=False)


if __name__ == "__main__":
    run_cli(main)
