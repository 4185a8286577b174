"""Resumable trainer state: safetensors for tensors, JSON for everything else, never pickle.

Layout under a run folder:
    state/step-00000120/  model.safetensors  optimizer.safetensors  trainer.json
    state/step-00000100/  (the previous complete state, kept in case the newest is damaged)
    state/latest.json     {"dir": "step-00000120", "step": 120}
A state folder is written under a temporary name, fsynced and renamed; only then does latest.json (itself
replaced atomically) point at it. A run killed at any moment leaves latest.json naming a complete state; a state
damaged afterwards (a truncated file) is skipped for the one before it (restore_state). A save that fails (a full
disk) removes its temporary folder and says so in one line.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bge.console import console
from bge.errors import UserError

LATEST = "latest.json"
KEEP = 2  # complete states kept: the newest and the one before it


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and os.replace, so readers see the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({e.strerror or e}); {path.name} was left as it was") from None


def undefined_reason(path: str) -> str:
    """Why a number is NaN, in words, for the notes beside the null that replaces it."""
    key = path.rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    if key in ("spearman", "pearson"):
        return f"{key.capitalize()} undefined: the gold scores or the model's cosines are constant"
    if key.startswith("head_"):
        return "the base model has no classification head"
    return "undefined (NaN or infinite)"


def json_safe(obj, notes: dict[str, str] | None = None, path: str = ""):
    """obj with every NaN or infinite float replaced by None (JSON has no NaN; strict readers reject a bare one); each
    replaced value's dotted path -> why, in `notes`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if notes is not None:
            notes[path] = undefined_reason(path)
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, notes, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, notes, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
    return obj


def json_text(obj, indent: int | None = 2) -> str:
    """A JSON document without NaN: undefined numbers are null, and an "undefined" entry says which and why."""
    notes: dict[str, str] = {}
    safe = json_safe(obj, notes)
    if notes and isinstance(safe, dict):
        safe["undefined"] = notes
    return json.dumps(safe, indent=indent, ensure_ascii=False, allow_nan=False)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict split into flat tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of optimizer_tensors: a state_dict that Optimizer.load_state_dict accepts."""
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNGs (CPU, and the current CUDA device's): what dropout draws from."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict,
               rng: list[dict[str, torch.Tensor]] | None = None, scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write a complete resumable state for `step`, point latest.json at it, and drop all but the KEEP newest.
    `rng` holds every rank's RNG states under torchrun (default: this process's); `scaler` is fp16's GradScaler,
    whose scale and growth tracker go to trainer.json (a resume must not restart at the initial scale)."""
    root = run_dir / "state"
    name = f"step-{step:08d}"
    tmp, final = root / (name + ".tmp"), root / name
    meta = {}
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = scaler.state_dict()
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        tensors, meta["optimizer"] = optimizer_tensors(optimizer)
        rngs = {f"rng.{r}.{k}": v for r, state in enumerate(rng or [rng_state()]) for k, v in state.items()}
        save_file({**tensors, **rngs}, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({**trainer, **meta}, indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
    except OSError as e:  # a full disk, say: leave nothing half-written, and the previous state as it was
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_state(run_dir)
        kept = f"the state of {previous.name} is intact" if previous else "no earlier state was saved"
        raise UserError(f"cannot write the trainer state {final} ({e.strerror or e}); the partial copy was removed "
                        f"and {kept}: free space and pass --resume {run_dir}") from None
    atomic_write_text(root / LATEST, json.dumps({"dir": name, "step": step}) + "\n")
    complete = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp") and p.name <= name)
    for old in [p for p in root.iterdir() if p.is_dir() and p not in complete[-KEEP:]]:  # and any torn leftover
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(run_dir: Path) -> Path | None:
    """The folder latest.json points at, or None when the run never saved a state."""
    pointer = run_dir / "state" / LATEST
    if not pointer.exists():
        return None
    try:
        return run_dir / "state" / json.loads(pointer.read_text())["dir"]
    except (ValueError, KeyError, OSError):
        return None


def saved_states(run_dir: Path) -> list[Path]:
    """The run's complete-looking states, newest first: the one latest.json names, then the others by step."""
    root = run_dir / "state"
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name),
                   reverse=True)
    first = latest_state(run_dir)
    return ([first] if first in found else []) + [p for p in found if p != first]


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model tensors, optimizer and RNG tensors, trainer dict) of a state folder, read whole before anything is
    applied; a damaged file raises (SafetensorError, ValueError, OSError, KeyError)."""
    trainer = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    if not isinstance(trainer, dict) or "step" not in trainer or "optimizer" not in trainer:
        raise ValueError("trainer.json lacks the step or the optimizer")
    return load_file(str(folder / "model.safetensors")), load_file(str(folder / "optimizer.safetensors")), trainer


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
               scaler: torch.amp.GradScaler | None = None) -> dict:
    """Restore model, optimizer, fp16 scaler and this rank's RNGs from a state folder; returns the trainer dict saved
    with them."""
    weights, tensors, trainer = read_state(folder)
    model.load_state_dict(weights)
    own = f"rng.{rank}." if any(k.startswith(f"rng.{rank}.") for k in tensors) else "rng.0."
    set_rng_state({k.removeprefix(own): v for k, v in tensors.items() if k.startswith(own)})
    opt = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    optimizer.load_state_dict(optimizer_state(opt, trainer.pop("optimizer")))
    saved_scaler = trainer.pop("scaler", None)
    if scaler is not None and scaler.is_enabled() and saved_scaler:
        scaler.load_state_dict(saved_scaler)
    return trainer


def restore_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                  scaler: torch.amp.GradScaler | None = None) -> tuple[dict, Path] | None:
    """Load the newest complete state (load_state); a damaged one (truncated file, broken JSON) is named in one line
    and the previous one is loaded instead. None when the run never saved a state."""
    states = saved_states(run_dir)
    problems = []
    for folder in states:
        try:
            trainer = load_state(folder, model, optimizer, rank, scaler)
        except (SafetensorError, ValueError, OSError, KeyError, RuntimeError) as e:
            problems.append(f"{folder.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            console.print(f"[yellow]state/{folder.name} is damaged ({problems[-1].split(': ', 1)[1]})[/]; trying the "
                          f"state before it")
            continue
        return trainer, folder
    if problems:
        raise UserError(f"{run_dir / 'state'}: no readable state ({'; '.join(problems)}); start a new run")
    return None
