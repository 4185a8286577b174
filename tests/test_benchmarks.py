"""The benchmark scripts run (tiny sizes, CPU): the GPU check's correctness harness, and the training benchmark's
side-by-side run with its fp32 loss-trajectory check against sentence-transformers."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*argv):
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    return r


def test_gpu_check_cpu_path(tmp_path, minilm_dir):
    run("benchmarks/gpu_check.py", "--make-models", str(tmp_path), "--sizes", "tiny", "--tokenizer", str(minilm_dir))
    # compiled paths are left to the device run (minutes of compilation on 2 cores), and FlexAttention has no
    # backward on CPU (its forward is checked against the padded path in test_model.py)
    run("benchmarks/gpu_check.py", "--check", str(tmp_path / "tiny"), "--device", "cpu", "--batch-size", "6",
        "--paths", "fp32 packed,bf16,bf16 packed", "--json", str(tmp_path / "check.json"))
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert [r["path"] for r in rows] == ["fp32 packed", "bf16", "bf16 packed"]
    assert all(r["ok"] for r in rows) and rows[0]["grad cosine"] > 0.99999


def test_training_benchmark_runs_both_sides_with_equal_fp32_losses(tmp_path, tiny_model_dir):
    out = tmp_path / "bench.json"
    run("benchmarks/train.py", "--model", str(tiny_model_dir), "--lengths", "12,40", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--repeats", "1", "--variants", "fp32,bf16+packed",
        "--vs", "sentence-transformers", "--check-loss", "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"bge fp32", "bge bf16+packed", "st fp32"}
    for runs in result["results"].values():
        assert runs[0]["samples_per_s"] > 0 and runs[0]["peak_memory_gb"] > 0 and 0 < runs[0]["mfu"] < 1
    assert result["loss_check"]["max_abs_diff"] <= 1e-4
    assert len(result["loss_check"]["bge"]) == 3


def test_encode_benchmark_compares_like_with_like(tmp_path, tiny_model_dir):
    out = tmp_path / "encode.json"
    r = run("benchmarks/encode.py", "--model", str(tiny_model_dir), "--n", "12", "--batch-size", "4", "--repeats", "1",
            "--max-length", "64", "--precisions", "fp32,bf16", "--vs", "sentence-transformers", "--json", str(out))
    assert set(json.loads(out.read_text())["results"]) == {"bge fp32", "bge bf16", "sentence-transformers fp32",
                                                          "sentence-transformers bf16"}
    cosine = float(r.stdout.split("agreement (fp32): min cosine bge vs sentence-transformers ")[1].split()[0])
    assert cosine > 0.99999  # same model, same fp32 arithmetic: the same embeddings
