"""Resumable trainer state: safetensors for tensors, JSON for everything else, never pickle.

Layout under a run folder:
    state/step-00000120/  model.safetensors  optimizer.safetensors  trainer.json
    state/latest.json     {"dir": "step-00000120", "step": 120}
A state folder is written under a temporary name, fsynced and renamed; only then does latest.json (itself
replaced atomically) point at it. A run killed at any moment leaves latest.json naming a complete state.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from bge.errors import UserError

LATEST = "latest.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and os.replace, so readers see the old or the new content, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
               rng: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write a complete resumable state for `step`, point latest.json at it, and drop older states.
    `rng` holds every rank's RNG states under torchrun (default: this process's)."""
    root = run_dir / "state"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    tensors, meta = optimizer_tensors(optimizer)
    rngs = {f"rng.{r}.{k}": v for r, state in enumerate(rng or [rng_state()]) for k, v in state.items()}
    save_file({**tensors, **rngs}, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer.json").write_text(json.dumps({**trainer, "optimizer": meta}, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(root)
    atomic_write_text(root / LATEST, json.dumps({"dir": name, "step": step}) + "\n")
    for old in root.iterdir():  # older states, and leftovers of a run killed mid-write
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(run_dir: Path) -> Path | None:
    """The folder latest.json points at, or None when the run never saved a state."""
    pointer = run_dir / "state" / LATEST
    if not pointer.exists():
        return None
    folder = run_dir / "state" / json.loads(pointer.read_text())["dir"]
    if not (folder / "trainer.json").exists():
        raise UserError(f"{pointer} points at {folder}, which is incomplete; the run folder was damaged")
    return folder


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0) -> dict:
    """Restore model, optimizer and this rank's RNGs from a state folder; returns the trainer dict saved with them."""
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    trainer = json.loads((folder / "trainer.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    own = f"rng.{rank}." if any(k.startswith(f"rng.{rank}.") for k in tensors) else "rng.0."
    set_rng_state({k.removeprefix(own): v for k, v in tensors.items() if k.startswith(own)})
    opt = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    optimizer.load_state_dict(optimizer_state(opt, trainer.pop("optimizer")))
    return trainer
