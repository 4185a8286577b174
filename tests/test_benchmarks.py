"""The benchmark scripts run (tiny sizes, CPU): the GPU check's correctness harness, and the training benchmark's
side-by-side run with its fp32 loss-trajectory check against sentence-transformers."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from conftest import long_passages_beir

REPO = Path(__file__).resolve().parents[1]


def run(*argv, env=None):
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    return r


def test_gpu_check_cpu_path(tmp_path, minilm_dir):
    run("benchmarks/gpu_check.py", "--make-models", str(tmp_path), "--sizes", "tiny", "--tokenizer", str(minilm_dir))
    # the packed compiled paths are left to the device run (minutes of compilation on 2 cores), and FlexAttention
    # has no backward on CPU (its forward is checked against the padded path in test_model.py); "cudagraphs" is
    # torch.compile's reduce-overhead mode, which on CPU compiles without graphs: the code path still runs here
    paths = ["fp32 packed", "fp32 varlen", "bf16", "bf16 packed", "bf16 varlen bucket", "bf16 compile", "bf16 cudagraphs"]
    run("benchmarks/gpu_check.py", "--check", str(tmp_path / "tiny"), "--device", "cpu", "--batch-size", "6",
        "--paths", ",".join(paths), "--json", str(tmp_path / "check.json"))
    rows = json.loads((tmp_path / "check.json").read_text())["rows"]
    assert [r["path"] for r in rows] == paths
    assert all(r["ok"] for r in rows) and rows[0]["grad cosine"] > 0.99999 and rows[1]["grad cosine"] > 0.99999


def test_training_benchmark_runs_both_sides_with_equal_fp32_losses(tmp_path, tiny_model_dir):
    out = tmp_path / "bench.json"
    run("benchmarks/train.py", "--model", str(tiny_model_dir), "--lengths", "12,40", "--batch-size", "4",
        "--steps", "2", "--warmup", "1", "--repeats", "1", "--variants", "fp32,bf16+packed",
        "--vs", "sentence-transformers", "--check-loss", "--profile", "--json", str(out))
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"bge fp32", "bge bf16+packed", "st fp32"}
    for runs in result["results"].values():
        assert runs[0]["samples_per_s"] > 0 and runs[0]["peak_memory_gb"] > 0 and 0 < runs[0]["mfu"] < 1
        top = runs[0]["profile"]["top"]  # the profiled steps' costliest operators, in ms per step
        assert len(top) == 8 and all(ms > 0 for _, ms in top) and top == sorted(top, key=lambda t: -t[1])
        # it profiled the model: its matmuls took time (in a tiny model they need not rank among the top 8)
        assert runs[0]["profile"]["matmul_ms"] > 0
    assert result["loss_check"]["max_abs_diff"] <= 1e-4
    assert len(result["loss_check"]["bge"]) == 3


def test_training_benchmark_varlen_gradcache_st_and_trajectory_check(tmp_path, tiny_model_dir):
    # the new path's variants, sentence-transformers' GradCache loss, a configuration that fails without stopping the
    # others, and the loss trajectories of two bge variants with dropout off
    out = tmp_path / "bench.json"
    r = run("benchmarks/train.py", "--model", str(tiny_model_dir), "--lengths", "12,40", "--batch-size", "4",
            "--steps", "2", "--warmup", "1", "--repeats", "1", "--variants", "fp32+varlen+bucket=64+adrop=0,fp32+gradcache=x",
            "--vs", "sentence-transformers", "--vs-variants", "fp32+cached=2", "--check-variants", "fp32,fp32+varlen",
            "--json", str(out))
    result = json.loads(out.read_text())
    assert [len(runs) for runs in result["results"].values()] == [1, 1, 0]  # st first, then the bge variants
    assert "bge fp32+gradcache=x failed" in r.stderr and "bge fp32+gradcache=x" in result["failed"]
    check = result["trajectory_check"]
    assert len(check["fp32"]["losses"]) == 3 and check["fp32+varlen"]["max_abs_diff"] <= 1e-5


def test_encode_benchmark_compares_like_with_like(tmp_path, tiny_model_dir):
    out = tmp_path / "encode.json"
    corpus = long_passages_beir(tmp_path / "corpus", n=12)  # SciFact-length passages; $BGE_SCIFACT points there
    r = run("benchmarks/encode.py", "--model", str(tiny_model_dir), "--n", "12", "--batch-size", "4", "--repeats", "1",
            "--max-length", "64", "--precisions", "fp32,bf16", "--vs", "sentence-transformers", "--json", str(out),
            env={**os.environ, "BGE_SCIFACT": str(corpus)})
    assert set(json.loads(out.read_text())["results"]) == {"bge fp32", "bge bf16", "sentence-transformers fp32",
                                                          "sentence-transformers bf16"}
    cosine = float(r.stdout.split("agreement (fp32): min cosine bge vs sentence-transformers ")[1].split()[0])
    assert cosine > 0.99999  # same model, same fp32 arithmetic: the same embeddings


def test_padding_report_bucketing_keeps_every_pair_and_cuts_padding():
    from benchmarks.common import padding_costs as costs
    from benchmarks.padding import bucketed
    rng = random.Random(0)
    pairs = [([1] * rng.randint(3, 20), [2] * rng.randint(5, 90)) for _ in range(64)]
    plain, sorted_pools = bucketed(pairs, 8, 1, seed=0), bucketed(pairs, 8, 4, seed=0)
    key = lambda batches: sorted((tuple(q), tuple(p)) for b in batches for q, p in zip(b["q"], b["p"]))
    assert key(plain) == key(sorted_pools) == sorted((tuple(q), tuple(p)) for q, p in pairs)
    assert all(len(b["q"]) == 8 for b in sorted_pools)
    (share_plain, att_plain), (share_sorted, att_sorted) = costs(plain), costs(sorted_pools)
    assert share_sorted < share_plain and att_sorted < att_plain
    one = [{"q": [[1] * 2, [1] * 6]}]  # padded to 8: 8 real tokens of 16; L^2: 2 * 64 padded over 4 + 36 real
    assert costs(one) == (0.5, 128 / 40)


def test_run_time_splits_a_real_train_command(tmp_path, tiny_model_dir):
    data = tmp_path / "bikes.jsonl"
    data.write_text("".join((REPO / "examples" / "bike_repair.jsonl").read_text().splitlines(keepends=True)[:40]))
    out = tmp_path / "runtime.json"
    r = run("benchmarks/run_time.py", "--json", str(out), "--", "--data", str(data), "--model", str(tiny_model_dir),
            "--out-dir", str(tmp_path / "runs"), "--batch-size", "8", "--max-steps", "2", "--max-passage-length", "32")
    result = json.loads(out.read_text())
    timing = result["timing"]
    assert Path(result["run"]).parent == tmp_path / "runs" and Path(result["run"]).name.startswith("runtime-")
    assert {"setup", "train", "validation", "test", "export", "checkpoint", "total", "peak_rss_gb"} <= set(timing)
    assert 0 < timing["total"] < result["wall_s"] and result["peak_rss_gb_os"] >= timing["peak_rss_gb"] * 0.9
    assert "train.py wall time by phase" in r.stdout + r.stderr and "validation" in r.stdout + r.stderr


def test_cpu_attention_benchmark_reports_both_paths_and_the_tables_limit(tmp_path):
    from bge.dropout import WRITTEN_OUT_UP_TO, cpu_kind
    out = tmp_path / "attention.json"
    run("benchmarks/attention_cpu.py", "--lengths", "8,24", "--heads", "2", "--dim", "8", "--repeats", "1",
        "--json", str(out))
    result = json.loads(out.read_text())
    assert result["cpu_kind"] == cpu_kind() and result["limit"] == WRITTEN_OUT_UP_TO[cpu_kind()]
    assert [r["length"] for r in result["rows"]] == [8, 24] and all(r["sdpa_ms"] > 0 for r in result["rows"])


def test_a_benchmark_table_in_a_log_file_keeps_its_numbers_whole(tmp_path):
    """A benchmark's table written to a file or a pipe (how long runs are logged) keeps its numbers: at rich's 80
    columns for a non-terminal, a ten-column table would cut every number to '0.71…'."""
    code = ("from benchmarks.common import print_table\n"
            "print_table('wide', [f'column {i}' for i in range(10)], [[f'0.7123 ± 0.0{i}45' for i in range(10)]])\n")
    log = tmp_path / "log.txt"
    with log.open("w") as f:
        r = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "COLUMNS": "80"})  # as pytest exports it
    text = log.read_text()
    assert r.returncode == 0, text
    assert "…" not in text and all(f"0.7123 ± 0.0{i}45" in text for i in range(10)), text
