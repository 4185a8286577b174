"""bge/malloc.py: with its settings a process reuses freed memory instead of faulting fresh pages in, and train.py
applies them on CPU unless --malloc system."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from bge import malloc

REPO = Path(__file__).resolve().parents[1]

# The bundled model encodes 32 texts of 256 tokens, four times: with glibc's defaults each batch's activations are
# unmapped or trimmed when freed and faulted in again by the next; kept, the next batch reuses them. Prints the minor
# page faults of the last three rounds.
ROUNDS = """
import resource, sys
import bge
from bge.malloc import keep_freed_memory
print(keep_freed_memory() if sys.argv[1] == "keep" else "system")
embedder = bge.load("all-MiniLM-L6-v2", device="cpu")
texts = [" ".join(f"word{i * 7 + j}" for j in range(300)) for i in range(32)]
embedder.encode(texts, batch_size=16, max_length=256, show_progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    embedder.encode(texts, batch_size=16, max_length=256, show_progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in malloc.ENV}  # the user's own settings would win
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=REPO, capture_output=True, text=True, check=True,
                         env=env)
    lines = out.stdout.split("\n")
    return lines[0], int(lines[-2])


@pytest.mark.skipif(not malloc.glibc(), reason="mallopt is glibc's; elsewhere malloc is left as it is")
def test_kept_memory_is_reused_without_page_faults():
    said, kept = faults("keep")
    _, system = faults("system")
    assert said.startswith("malloc keeps freed memory")
    assert kept * 5 < system, (kept, system)  # measured: 6-8k against 140-290k (either setting alone: 310k, 1.05M)


def test_environment_settings_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    said = malloc.keep_freed_memory()
    assert said in ("malloc left to MALLOC_TRIM_THRESHOLD_ from the environment", "not glibc: malloc left as it is")


@pytest.mark.parametrize("flag, calls", [("keep", 1), ("system", 0)])
def test_train_keeps_freed_memory_on_cpu_unless_told(flag, calls, tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "bikes.jsonl"
    data.write_text("".join((REPO / "examples" / "bike_repair.jsonl").read_text().splitlines(keepends=True)[:30]))
    seen = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: seen.append(1) or "malloc: what was done")
    train.main(["--data", str(data), "--model", str(tiny_model_dir), "--out-dir", str(tmp_path), "--device", "cpu",
                "--batch-size", "8", "--max-passage-length", "32", "--max-query-length", "16", "--epochs", "1",
                "--malloc", flag])
    assert len(seen) == calls
    assert ("malloc: what was done" in capsys.readouterr().err) == bool(calls)  # the run's log says what it did
