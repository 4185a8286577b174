"""Training curves (bge/plot.py: curves.png, text sparklines) and --report-to tensorboard (bge/tracking.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import train
from bge import plot, tracking
from conftest import squash
from bge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "bike_repair.jsonl"


def write_run(folder: Path, steps: int = 30, several_tasks: bool = False, seed: float = 0.0) -> Path:
    """A run folder with a metrics.jsonl as train.py writes it: a validation line every 10 steps, a probe."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(steps + 1):
        if step:
            lines.append({"step": step, "epoch": 0, "task": "retrieval", "loss": 3.0 / step + seed, "acc": step / steps,
                          "lr": 1e-4 * (1 - step / steps), "tokens_per_s": 1000.0, "skipped": False})
        if step % 10 == 0:
            score = 0.5 + step / 100 + seed
            val = ({"val/retrieval/ndcg@10": score, "val/retrieval/ndcg@1": score, "val/sts/spearman": score}
                   if several_tasks else {"val/ndcg@1": score, "val/ndcg@10": score, "val/mrr@10": score,
                                          "val/recall@10": score, "val/recall@100": score})
            lines.append({"step": step, **val, "val/score": score, "probe/spearman": 0.8 - step / 1000})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return folder


def test_sparkline_and_smoothing_against_naive_references() -> None:
    assert plot.sparkline([0, 1, 2, 3, 4, 5, 6, 7]) == "▁▂▃▄▅▆▇█"
    assert plot.sparkline([5.0] * 3) == "▁▁▁"
    assert plot.sparkline(list(range(80)), width=4) == "▁▃▆█"  # four buckets of 20, averaged
    assert plot.sparkline([]) == ""
    values = [4.0, 2.0, 3.0, 1.0]
    naive = []
    for i in range(1, len(values) + 1):  # the weighted mean of what came so far, weights 0.9^(i-j)
        w = [0.9 ** (i - j) for j in range(1, i + 1)]
        naive.append(sum(wi * v for wi, v in zip(w, values[:i])) / sum(w))
    assert plot.smooth(values) == pytest.approx(naive)


def test_validation_panels_are_the_ending_table_metrics_and_probes(tmp_path) -> None:
    _, one = plot.read_metrics(write_run(tmp_path / "one"))
    assert plot.validation_keys(one) == ["val/ndcg@10", "val/mrr@10", "val/recall@10", "val/recall@100",
                                         "probe/spearman"]
    _, many = plot.read_metrics(write_run(tmp_path / "many", several_tasks=True))
    assert plot.validation_keys(many) == ["val/retrieval/ndcg@10", "val/sts/spearman", "val/score",
                                          "probe/spearman"]


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_curves_png_and_overlay_of_several_runs(tmp_path, capsys) -> None:
    a, b = write_run(tmp_path / "a"), write_run(tmp_path / "b", seed=0.1)
    plot.main([str(a)])
    width, height = png_size(a / "curves.png")  # 8 panels: 3 columns x 3 rows
    assert (width, height) == (round(4.2 * 3 * 110), round(3.0 * 3 * 110))
    plot.main([str(a), str(b), "--out", str(tmp_path / "both.png")])
    assert png_size(tmp_path / "both.png") == (width, height)
    assert f"wrote{tmp_path / 'both.png'}" in squash(capsys.readouterr().err)
    with pytest.raises(UserError, match="no metrics.jsonl; pass a train.py run folder"):
        plot.main([str(tmp_path)])


def test_without_matplotlib_the_end_of_a_run_prints_sparklines(tmp_path, monkeypatch, capsys) -> None:
    run = write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plot.after_run(run) is None
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("loss               █") and lines[0].endswith("3.0000 → 0.1000 (steps 1-30)")
    assert lines[1] == "validation score   ▁▃▆█  0.5000 → 0.8000 (best 0.8000 at step 30)"  # 0.5 ... 0.8
    assert lines[2] == "(pip install matplotlib for curves.png)"
    assert not (run / "curves.png").exists()
    with pytest.raises(UserError, match="needs matplotlib"):
        plot.main([str(run)])


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="--report-to tensorboard needs the tensorboard package: pip install "
                                        "tensorboard"):
        tracking.open_tracker("tensorboard", tmp_path)
    assert tracking.open_tracker("none", tmp_path) is None


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_a_resume_drops_what_came_after_the_state(tmp_path) -> None:
    first = tracking.open_tracker("tensorboard", tmp_path)
    for step in range(1, 6):
        first.log({"step": step, "task": "retrieval", "loss": float(step), "skipped": False})
    first.log({"step": 5, "val/ndcg@10": 0.5})
    first.close()
    resumed = tracking.open_tracker("tensorboard", tmp_path)  # a killed run resumed from its state at step 3
    resumed.log({"step": 4, "loss": 40.0})
    resumed.close()
    got = scalars(tmp_path / "tensorboard")
    assert set(got) == {"loss", "val/ndcg@10"}  # strings and booleans are no scalars
    assert got["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_a_run_writes_curves_and_tensorboard_with_the_metrics_jsonl_numbers(tiny_model_dir, tmp_path) -> None:
    data = tmp_path / "bikes.jsonl"
    data.write_text("".join(EXAMPLE.read_text().splitlines(keepends=True)[:60]))
    train.main(["--data", str(data), "--model", str(tiny_model_dir), "--out-dir", str(tmp_path), "--run-name", "r",
                "--batch-size", "8", "--group-size", "2", "--max-passage-length", "48", "--max-query-length", "16",
                "--lr", "1e-3", "--epochs", "2", "--explain", "0", "--report-to", "tensorboard"])
    run = tmp_path / "r"
    png_size(run / "curves.png")
    steps, validations = plot.read_metrics(run)
    got = scalars(run / "tensorboard")
    assert got["loss"] == [(l["step"], pytest.approx(l["loss"])) for l in steps]
    assert got["val/ndcg@10"] == [(v["step"], pytest.approx(v["val/ndcg@10"])) for v in validations]
    assert "task" not in got and "skipped" not in got
