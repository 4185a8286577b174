"""A run folder's life outside the training loop: made (or found again by --resume) with its config, held by one
process at a time, removed when its start fails, repaired when a kill left an export half-swapped, checked before a
resume, and its log trimmed to the state a resume continues from.

    open_run   a new run's folder with config.json, command.txt and git.txt; or --resume's folder and saved config,
               of which only RESUMABLE_OVERRIDES may change
    claim      lock the folder (fcntl.flock on `.lock`: the kernel drops it when the process dies, so a killed run
               never blocks its own resume) and, for a new run, insist that the folder is new or empty
    held       the context train.py runs in: however it ends the lock is released, and a start that fails before
               the first training step removes what it created (a folder that can never finish helps nobody)
    recover_exports   best/, final/, merged/ as bge.weights.replace_folder leaves them when killed between its two
               renames: the folder missing, its complete new copy in X.tmp and the old one in X.old
    check_resume      a resume under another world size changes the global batch, the sampler and the schedule
    trim_metrics      forget what was logged after the state a resume continues from
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from bge import __version__, distributed
from bge.checkpoint import atomic_write_text, saved_states
from bge.config import TrainConfig, config_from_dict
from bge.console import console
from bge.data import data_sources
from bge.errors import UserError

LOCK = ".lock"
EXPORTS = ("best", "final", "merged")
RESUMABLE_OVERRIDES = {"epochs", "max_steps", "cache_dir", "patience", "eval_every", "save_every", "device", "compile",
                       "eval_batch_size", "resume", "explain", "threshold_precision", "log_every", "compile_mode",
                       "report_to"}  # what may change when a run continues
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the checkout bge runs from, or the site-packages it is installed in
_held: list["Claim"] = []  # the folders this process holds, released by `held`


def open_run(cfg: TrainConfig, explicit: set[str], info: distributed.DistInfo,
             command: str) -> tuple[TrainConfig, Path, "Claim | None"]:
    """(the run's config, its folder, this process's claim on it; None on ranks other than 0). A new run: --data
    checked, the folder (--run-name, else the data's name and the time) claimed and config.json, command.txt and
    git.txt written. --resume: the saved config, with the `explicit` fields of RESUMABLE_OVERRIDES as given (any
    other explicit field is an error), the folder claimed and a half-swapped export repaired."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume {run_dir}: not a run folder (no config.json)")
        changed = explicit - RESUMABLE_OVERRIDES
        if changed:
            raise UserError(f"--resume continues the saved config; cannot change {', '.join(sorted(changed))}")
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = config_from_dict({**saved, **{k: getattr(cfg, k) for k in explicit}}, str(run_dir / "config.json"))
        check_resume(run_dir, info.world)
        held_by = claim(run_dir, fresh=False) if info.main else None
        for note in recover_exports(run_dir) if info.main else []:
            console.print(f"[yellow]{note}[/]")
        return cfg, run_dir, held_by
    data_sources(cfg.data, cfg.extra_data)  # a missing or unreadable --data is said before any folder is made
    more = f"+{len(cfg.data) - 1}" if len(cfg.data) > 1 else ""
    name = distributed.broadcast(cfg.run_name or f"{Path(cfg.data[0]).stem}{more}-{datetime.now():%Y%m%d-%H%M%S}", info)
    run_dir = Path(cfg.out_dir) / name
    held_by = claim(run_dir, fresh=True) if info.main else None  # one run per folder, locked
    if info.main:
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        atomic_write_text(run_dir / "command.txt", command + "\n")
        atomic_write_text(run_dir / "git.txt", git_commit() + "\n")
    distributed.barrier(info)
    return cfg, run_dir, held_by


def git_commit(root: Path = PACKAGE_ROOT) -> str:
    """The commit of the checkout bge runs from (-dirty if changed), whatever the working directory; an installed
    copy is no checkout (it may sit inside another one, a venv in a repo): its package version."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == root:
            return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"unknown (not a git checkout: bge-finetune {__version__})"


class Claim:
    """This process's hold on a run folder."""

    def __init__(self, path: Path, fd: int, created: bool, fresh: bool):
        self.path, self.fd, self.created, self.fresh = path, fd, created, fresh
        self.started = False  # set when training begins: from then on a failure keeps the folder (log, state)

    def start(self) -> None:
        """Training begins: a failure from here on keeps the folder."""
        self.started = True

    def release(self, failed: bool = False) -> None:
        """Drop the lock; after a failed start of a new run, remove what the start wrote (the folder, if it made it)."""
        if self in _held:
            _held.remove(self)
        if self.fd < 0:
            return
        if failed and self.fresh and not self.started:
            for p in self.path.iterdir():
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            if self.created:
                shutil.rmtree(self.path, ignore_errors=True)
        os.close(self.fd)
        self.fd = -1


def claim(path: Path, fresh: bool) -> Claim:
    """Hold `path` for this process. fresh: a new run, which needs the folder new or empty (two runs given the same
    --run-name at once: the second is refused here, not half-way through a save); else a resume of the run there."""
    created = fresh and not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = (path / LOCK).read_text().strip() or "another process"
        raise UserError(f"{path} is in use by another run ({holder}); wait for it, or pass another --run-name") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    if fresh and any(p.name != LOCK for p in path.iterdir()):
        os.close(fd)
        if (path / "config.json").exists():
            raise UserError(f"{path} already holds a run; pass --resume {path} or another --run-name")
        raise UserError(f"{path} exists and is not empty; pass another --run-name (or remove it)")
    c = Claim(path, fd, created, fresh)
    _held.append(c)
    return c


@contextmanager
def held() -> Iterator[None]:
    """Release every folder claimed inside, however the body ends; a failed start removes what it created."""
    outer = len(_held)  # claims made before (by a caller) are the caller's to release
    try:
        yield
    except BaseException:
        while len(_held) > outer:
            _held.pop().release(failed=True)
        raise
    while len(_held) > outer:
        _held.pop().release()


def recover_exports(run_dir: Path) -> list[str]:
    """Put back a best/, final/ or merged/ that a kill between replace_folder's two renames left missing (the new copy
    in X.tmp is complete: it is written before the swap; failing that, the old one in X.old); remove leftovers.
    Returns one line per folder recovered."""
    notes = []
    for name in EXPORTS:
        folder, tmp, old = (run_dir / f"{name}{s}" for s in ("", ".tmp", ".old"))
        if not folder.exists():
            source = tmp if tmp.is_dir() and old.is_dir() else old if old.is_dir() else None
            if source is not None:
                source.rename(folder)
                notes.append(f"{name}/ was missing (an export killed mid-swap); recovered from {source.name}/")
        for leftover in (tmp, old):  # a finished swap's old copy, or a write killed before its swap
            shutil.rmtree(leftover, ignore_errors=True)
    return notes


def check_resume(run_dir: Path, world: int) -> None:
    """Refuse a resume under another number of processes than the run's state was saved with: the global batch,
    the sampler's batches and the schedule's length all depend on it."""
    for folder in saved_states(run_dir):
        try:
            saved = json.loads((folder / "trainer.json").read_text(encoding="utf-8")).get("world")
        except (OSError, ValueError, AttributeError):
            continue  # damaged: restore_state says so and takes the one before
        if saved is not None and saved != world:
            raise UserError(f"{run_dir} was trained by {saved} process(es); resume it with {saved} (torchrun "
                            f"--nproc_per_node {saved}), not {world}: the global batch and the schedule depend on it")
        return


def fixed_schedule(trainer: dict, total_steps: int, warmup_steps: int, schedule: str) -> tuple[int, int]:
    """(total, warmup) steps of the learning-rate schedule: fixed when the run starts and kept in its state, so that
    a resume with another --epochs / --max-steps stops elsewhere without rescaling the warmup and decay of the steps
    already taken. Running past the fixed end is refused unless the schedule is constant (the rate is at its floor
    there: the extra steps would not train)."""
    saved = trainer.setdefault("schedule", {"total_steps": total_steps, "warmup_steps": warmup_steps})
    if total_steps > saved["total_steps"] and schedule != "constant":
        raise UserError(f"this run's {schedule} schedule was fixed at {saved['total_steps']} steps when it started; "
                        f"{total_steps} would train on at a learning rate of 0 after it: continue with fewer steps, "
                        f"or start a new run from its best/ (--model <run>/best)")
    return saved["total_steps"], saved["warmup_steps"]


def trim_metrics(path: Path, step: int | None) -> None:
    """Keep the lines logged up to the resumed state's step (None: the run saved no state, so it restarts at step 0
    and logs its step-0 validation again: keep nothing)."""
    if not path.exists():
        return
    kept = [l for l in path.read_text().splitlines() if step is not None and json.loads(l)["step"] <= step]
    atomic_write_text(path, "".join(l + "\n" for l in kept))
