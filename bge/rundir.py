"""A run folder's life outside the training loop: held by one process at a time, removed when its start fails,
repaired when a kill left an export half-swapped, checked before a resume, and its log trimmed to the state a resume
continues from.

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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bge.checkpoint import atomic_write_text, saved_states
from bge.errors import UserError

LOCK = ".lock"
EXPORTS = ("best", "final", "merged")
_held: list["Claim"] = []  # the folders this process holds, released by `held`


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
