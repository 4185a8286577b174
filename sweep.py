"""Run an ablation: every cell of (presets x grid) is an ordinary train.py run in its own folder, then one results
table (rich here; CSV, markdown and JSON on disk) with test metrics, parameters, training time and encoding speed.

    python sweep.py configs/scifact/finetune.toml --grid loss.temperature=0.01,0.02,0.05
    python sweep.py configs/scifact/*.toml --out checkpoints/sweeps/scifact
    python sweep.py configs/tiny.toml --grid arch=bert,bilstm loss.temperature=0.02,0.05 --set epochs=1 --dry-run

A cell is fully described by its config: the preset, then --set, then its grid values (keys as in presets: `epochs`
or `optim.epochs`). Its folder is <out>/<preset name> plus `-key=value` for each grid value that differs from the
preset's own, so the cell of a grid value the preset already has is the same folder as a run of the bare preset.
Re-running a sweep skips finished cells (results.json), resumes interrupted ones from their last saved state, and
refuses a folder whose saved config is not the cell's.
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bge.config import TrainConfig, check_ranges, parse_args, parse_setting
from bge.console import console, console_for, run_cli
from bge.errors import UserError
from bge.rundir import RESUMABLE_OVERRIDES
from bge.runs import add_table_args, report

REPO = Path(__file__).resolve().parent


@dataclass
class Cell:
    name: str
    argv: list[str]  # train.py flags, without --out-dir and --run-name
    cfg: TrainConfig


def parse_settings(items: list[str], flag: str, many: bool) -> dict[str, list[str]]:
    """`key=v1,v2` (grid) or `key=value` (--set) -> {field name: raw values}, each value checked against its field."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not values:
            raise UserError(f"{flag} {item!r}: expected key={'v1,v2,...' if many else 'value'}")
        raw = [v.strip() for v in values.split(",")] if many else [values]
        name = [parse_setting(key.strip(), v, f"{flag} {key}") for v in raw][0][0]
        if name in out:
            raise UserError(f"{flag}: {key} given twice")
        out[name] = raw
    return out


def to_flags(settings: dict[str, str]) -> list[str]:
    """{field: raw value} -> train.py flags (booleans as --x / --no-x)."""
    argv = []
    for name, raw in settings.items():
        flag = name.replace("_", "-")
        value = parse_setting(name, raw, f"--{flag}")[1]
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            argv += [f"--{flag}", raw]
    return argv


def expand(presets: list[Path], grid: dict[str, list[str]], fixed: dict[str, str]) -> list[Cell]:
    """Every (preset, grid combination), named by the preset and the grid values that change it."""
    cells = []
    for preset in presets:
        base_argv = ["--config", str(preset), *to_flags(fixed)]
        base, _ = parse_args(base_argv)
        for combo in itertools.product(*grid.values()):
            values = dict(zip(grid, combo))
            argv = base_argv + to_flags(values)
            cfg, _ = parse_args(argv)
            changed = [f"-{k}={v}" for k, v in values.items() if getattr(cfg, k) != getattr(base, k)]
            name = re.sub(r"[^\w.=+-]+", "_", preset.stem + "".join(changed))
            cells.append(Cell(name, argv, cfg))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise UserError(f"two cells share a folder name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        f"give the presets different file names")
    return cells


def state_of(folder: Path, cfg: TrainConfig) -> str:
    """'done', 'resume' (a folder of this cell without results), or 'new'; a folder of another config is an error."""
    saved_path = folder / "config.json"
    if not saved_path.exists():
        return "new"
    saved = json.loads(saved_path.read_text())
    want = cfg.to_dict()
    ignore = RESUMABLE_OVERRIDES | {"out_dir", "run_name"}  # where the folder is, not what it trains
    differ = sorted(k for k in set(saved) | set(want) if k not in ignore and saved.get(k) != want.get(k))
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} there, {want.get(k)!r} now" for k in differ[:4])
        raise UserError(f"{folder} holds a run of another config ({shown}); delete it or pass another --out")
    return "done" if (folder / "results.json").exists() else "resume"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("presets", nargs="+", type=Path, help="preset TOML files (configs/...); each is crossed with the grid")
    p.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                   help="values to sweep; several keys make the cross product")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", dest="fixed",
                   help="a setting for every cell, over the presets (not part of cell names)")
    p.add_argument("--out", type=Path, default=None, help="sweep folder (default checkpoints/sweeps/<first preset>)")
    p.add_argument("--table", default="results", help="file stem of the table in the sweep folder (.csv, .md, .json): "
                   "sweeps that share a folder keep their own tables")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state; train nothing")
    add_table_args(p)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    return check_ranges(p, p.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    for preset in a.presets:
        if not preset.is_file():
            raise UserError(f"{preset}: no such preset file")
    grid = parse_settings(a.grid, "--grid", many=True)
    fixed = {k: v[0] for k, v in parse_settings(a.fixed, "--set", many=False).items()}
    clash = sorted(set(grid) & set(fixed) | set(grid) & {"out_dir", "run_name", "resume"})
    if clash:
        raise UserError(f"--grid cannot set {', '.join(clash)}")
    out = a.out or Path("checkpoints/sweeps") / a.presets[0].stem
    cells = expand(a.presets, grid, fixed)
    states = {c.name: state_of(out / c.name, c.cfg) for c in cells}
    console.print(f"sweep {out}: {len(cells)} cells, " +
                  ", ".join(f"{sum(s == k for s in states.values())} {k}" for k in ("done", "resume", "new")))
    for c in cells:
        console.print(f"  {states[c.name]:>6}  {c.name}", markup=False, highlight=False)
    if a.dry_run:
        return

    failed = []
    for i, c in enumerate(cells, 1):
        folder = out / c.name
        if states[c.name] == "done":
            continue
        console.rule(f"cell {i}/{len(cells)}: {c.name}")
        # a subprocess per cell: a clean torch (threads, RNG, memory) and its own command.txt, and one failing cell
        # does not end the sweep
        flags = ["--resume", str(folder)] if states[c.name] == "resume" else c.argv + ["--out-dir", str(out),
                                                                                      "--run-name", c.name]
        rc = subprocess.run([sys.executable, str(REPO / "train.py"), *flags]).returncode
        if rc != 0:
            failed.append(f"{c.name} (exit {rc})")
            if rc == 130:  # interrupted: stop here, the next sweep resumes
                break

    finished = [out / c.name for c in cells if (out / c.name / "results.json").exists()]
    if finished:
        title = f"sweep {out.name}: {', '.join(p.stem for p in a.presets)}" + (f" × {', '.join(a.grid)}" if a.grid else "")
        table, png = report(finished, out / a.table, title, a)
        console_for("stdout").print(table)
        console.print(f"wrote {out / a.table}.csv, .md and .json" + (f" and {png}" if png else ""), markup=False,
                      highlight=False)
    if failed:
        raise UserError(f"{len(failed)} cell(s) failed: {', '.join(failed)}; re-run the same command to retry them")


if __name__ == "__main__":
    run_cli(main)
