"""Where a real train.py run's wall time goes: training, validation, test, export, checkpoints and set-up.

    python benchmarks/run_time.py -- --config configs/scifact/mined.toml
    python benchmarks/run_time.py --json runtime.json -- --data examples/bike_repair.jsonl --epochs 1

Runs train.py with the arguments after `--` in a child process (adding a --run-name when there is none, so the run
folder is known), then prints train.py's own account (results.json `timing`: its seconds by phase and its peak RSS)
next to the command's wall time and the child's peak RSS as the operating system counted it.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_table, write_json
from bge.config import parse_args

REPO = Path(__file__).resolve().parents[1]
PHASES = ("setup", "train", "validation", "mining", "test", "export", "checkpoint")


def run_folder(argv: list[str]) -> tuple[list[str], Path]:
    """The train.py arguments (with a --run-name added if none) and the run folder they write."""
    cfg, _ = parse_args(argv)
    if cfg.resume:
        return argv, Path(cfg.resume)
    if not cfg.run_name:
        cfg.run_name = f"runtime-{datetime.now():%Y%m%d-%H%M%S}"
        argv = [*argv, "--run-name", cfg.run_name]
    return argv, Path(cfg.out_dir) / cfg.run_name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's arguments")
    a = p.parse_args()
    argv = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    argv, folder = run_folder(argv)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO)
    wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"train.py exited with {done.returncode}")
    rss_os = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e9
    timing = json.loads(((folder if folder.is_absolute() else REPO / folder) / "results.json").read_text())["timing"]
    rows = [[phase, f"{timing.get(phase, 0.0):.1f}", f"{100 * timing.get(phase, 0.0) / wall:.0f}%"] for phase in PHASES]
    rows += [["train.py (inside the process)", f"{timing['total']:.1f}", f"{100 * timing['total'] / wall:.0f}%"],
             ["command (with interpreter start and imports)", f"{wall:.1f}", "100%"]]
    print_table(f"train.py wall time by phase · {folder} · peak RSS {timing['peak_rss_gb']:.2f} GB (train.py, reached in "
                f"{timing['peak_rss_phase']}), {rss_os:.2f} GB (OS)", ["phase", "seconds", "of the command"], rows)
    write_json(a.json, {"command": argv, "run": str(folder), "wall_s": wall, "peak_rss_gb_os": rss_os, "timing": timing})


if __name__ == "__main__":
    main()
