"""sweep.py end to end on tiny models: cells named by what the grid changes, each a train.py run, finished cells
skipped, an interrupted one resumed, one results table (CSV, markdown) that evaluate.py --compare reproduces."""
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

import sweep
from bge.errors import UserError
from conftest import long_passages_beir
from bge.runs import pareto_front, plot_pareto, trade_off

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "bike_repair.jsonl"


@pytest.fixture(scope="module")
def preset(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("sweep")
    data = root / "bikes.jsonl"
    data.write_text("".join(EXAMPLE.read_text().splitlines(keepends=True)[:60]))
    path = root / "tiny.toml"
    path.write_text(f'data = "{data}"\nmodel = "{tiny_model_dir}"\nthreads = 1\nmax_passage_length = 48\n'
                    "max_query_length = 16\nlstm_hidden = 8\n[loss]\nbatch_size = 8\ngroup_size = 2\n"
                    "[optim]\nlr = 1e-3\nepochs = 1\n")
    return path


@pytest.fixture(scope="module")
def speed(tmp_path_factory):
    """How the table measures encoding speed: on 8 generated passages of SciFact's length, one thread."""
    corpus = long_passages_beir(tmp_path_factory.mktemp("speed") / "corpus", n=8)
    return ["--speed-corpus", str(corpus), "--speed-n", "8", "--speed-threads", "1"]


def test_cells_are_named_by_the_grid_values_that_change_the_preset(preset):
    grid = sweep.parse_settings(["arch=bert,bilstm", "loss.temperature=0.02,0.05"], "--grid", many=True)
    cells = sweep.expand([preset], grid, {"epochs": "2"})
    assert [c.name for c in cells] == ["tiny", "tiny-temperature=0.05", "tiny-arch=bilstm",
                                       "tiny-arch=bilstm-temperature=0.05"]
    assert [(c.cfg.arch, c.cfg.temperature, c.cfg.epochs, c.cfg.batch_size) for c in cells][-1] == ("bilstm", 0.05, 2, 8)
    with pytest.raises(UserError, match="unknown setting 'loss.epochs'"):
        sweep.parse_settings(["loss.epochs=1,2"], "--grid", many=True)
    with pytest.raises(UserError, match="temperature must be float"):
        sweep.parse_settings(["temperature=0.1,hot"], "--grid", many=True)
    with pytest.raises(UserError, match="expected key=v1,v2"):
        sweep.parse_settings(["temperature"], "--grid", many=True)


def test_sweep_runs_skips_resumes_and_tabulates(preset, tmp_path, monkeypatch, speed):
    out = tmp_path / "sw"
    argv = [str(preset), "--grid", "arch=bert,bilstm", "--set", "max_steps=3", "--out", str(out), *speed]
    sweep.main(argv)
    for cell in ("tiny", "tiny-arch=bilstm"):
        for f in ("results.json", "best/model.safetensors", "speed.json", "command.txt"):
            assert (out / cell / f).exists(), (cell, f)
    assert (out / "tiny-arch=bilstm" / "best" / "bge_config.json").exists()
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], r["arch"]) for r in rows] == [("tiny", "bert"), ("tiny-arch=bilstm", "bilstm")]
    for r in rows:
        assert 0 <= float(r["ndcg@10"]) <= 1 and int(r["params"]) > int(r["params_no_emb"]) > 0
        assert float(r["train_seconds"]) > 0 and float(r["passages_per_s"]) > 0
    quality_speed = [(float(r["ndcg@10"]), float(r["passages_per_s"])) for r in rows]
    assert [r["pareto"] for r in rows] == [str(on) for on in pareto_front(quality_speed)]
    assert "True" in [r["pareto"] for r in rows]  # someone is always on the front
    # timed at the length each run was trained and tested at (the preset's max_passage_length), unless told otherwise
    assert json.loads((out / "tiny" / "speed.json").read_text())["key"]["max_length"] == 48
    if has_matplotlib():
        assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "results.md").read_text()
    assert "| run | arch | nDCG@10 |" in md and "| tiny-arch=bilstm | bilstm |" in md

    # a second sweep trains nothing; a cell without results.json is resumed, the finished one left alone
    (out / "tiny-arch=bilstm" / "results.json").unlink()
    calls = []
    real_run = subprocess.run
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real_run(cmd, **kw))
    sweep.main(argv)
    assert len(calls) == 1 and calls[0][-2:] == ["--resume", str(out / "tiny-arch=bilstm")]
    calls.clear()
    sweep.main(argv)
    assert calls == []

    # a folder of another config is refused, not silently reused
    with pytest.raises(UserError, match="holds a run of another config .*warmup_ratio"):
        sweep.main([str(preset), "--grid", "arch=bert,bilstm", "--set", "max_steps=3", "warmup_ratio=0.2",
                    "--out", str(out), "--no-speed"])

    # evaluate.py --compare builds the same table from the run folders (speed read back from speed.json)
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--compare", *map(str, sorted(out.iterdir())),
                        "--out", str(tmp_path / "cmp"), *speed], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"skipped {len(list(out.iterdir())) - 2} folder(s)" in r.stderr  # cache/ and results.* are not runs
    assert (tmp_path / "cmp.md").read_text().split("\n", 1)[1] == md.split("\n", 1)[1]
    assert "tiny-arch=bilstm" in r.stdout and "passages/s" in r.stdout


def test_missing_preset_and_clashing_grid_are_errors(preset, tmp_path):
    with pytest.raises(UserError, match="no such preset"):
        sweep.main([str(tmp_path / "nope.toml")])
    with pytest.raises(UserError, match="--grid cannot set epochs"):
        sweep.main([str(preset), "--grid", "epochs=1,2", "--set", "epochs=3", "--dry-run"])


def test_rows_are_named_by_run_even_when_given_best(tmp_path, tiny_model_dir):
    """`evaluate.py --compare run/best ...` tabulates the runs under their own names, and --model labels a run's
    export folder `<run>/best`, never a column of identical 'best' rows."""
    import shutil

    from bge.runs import as_run, model_label

    runs = []
    for name, ndcg in (("lr-1e-5", 0.5), ("lr-3e-5", 0.6)):
        run = tmp_path / name
        shutil.copytree(tiny_model_dir, run / "best")
        (run / "config.json").write_text(json.dumps({"lr": float(name[3:])}))
        (run / "results.json").write_text(json.dumps({"config": {"lr": float(name[3:])}, "fine_tuned": {
            "ndcg@10": ndcg, "mrr@10": ndcg, "recall@10": ndcg, "recall@100": ndcg}, "train_seconds": 1.0}))
        runs.append(run)
    assert as_run(runs[0] / "best") == runs[0] and as_run(runs[0]) == runs[0] and as_run(tmp_path) == tmp_path
    assert model_label(str(runs[0] / "best")) == "lr-1e-5/best"
    assert model_label(str(runs[1] / "final")) == "lr-3e-5/final"
    assert model_label(str(tiny_model_dir)) == Path(tiny_model_dir).name and model_label("BAAI/bge-small-en-v1.5") \
        == "bge-small-en-v1.5"
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--compare", str(runs[0] / "best"),
                        str(runs[1] / "best"), str(runs[1]), "--out", str(tmp_path / "cmp"), "--no-speed"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "cmp.md").read_text().splitlines()
    rows = [l.split(" | ")[0].strip("| ") for l in table if l.startswith("| lr")]
    assert rows == ["lr-1e-5", "lr-3e-5"] and "skipped" not in r.stderr


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_pareto_front_against_the_definition():
    rng = random.Random(0)
    for _ in range(300):
        points = [(rng.randint(0, 4) / 4, float(rng.randint(1, 5))) for _ in range(rng.randint(1, 9))]  # many ties
        naive = [not any(q2 >= q and s2 >= s and (q2, s2) != (q, s) for q2, s2 in points) for q, s in points]
        assert pareto_front(points) == naive, points
    assert pareto_front([(0.5, 10.0), (0.5, 10.0)]) == [True, True]  # equal points: neither dominates


def test_trade_off_and_plot_skip_runs_without_both_numbers(tmp_path, monkeypatch):
    row = lambda name, ndcg, speed: {"run": name, "test": {"ndcg@10": ndcg} if ndcg is not None else None,
                                     "passages_per_s": speed}
    rows = [row("slow-good", 0.7, 25.0), row("fast-poor", 0.4, 100.0), row("dominated", 0.3, 50.0),
            row("no-speed", 0.9, None), row("sts", None, 80.0)]
    assert trade_off(rows) == [True, True, False, None, None]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: no plot, no error
    assert plot_pareto(rows, tmp_path / "p.png", "t") is None and not (tmp_path / "p.png").exists()
    assert plot_pareto(rows[3:], tmp_path / "q.png", "t") is None  # nothing to plot
