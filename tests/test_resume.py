"""Resume and run folders: the fp16 scaler and an early stop are part of the state, a resume keeps the world size and
the schedule fixed at the start, a damaged state falls back to the one before, a full disk and a failed start leave
nothing behind, one run per folder, exports recovered after a kill mid-swap, and no bare NaN in any JSON output."""
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
import bge.tasks
from conftest import squash
from bge import checkpoint, rundir, weights
from bge.errors import UserError

from test_train import args, data  # noqa: F401  (the 60-line bikes file, and small settings)

REPO = Path(__file__).resolve().parents[1]


def lines(run: Path) -> list[dict]:
    return [json.loads(l, parse_constant=pytest.fail) for l in (run / "metrics.jsonl").read_text().splitlines()]


def strict_json(path: Path):
    """The file parsed by a reader that rejects NaN and Infinity, as JavaScript's JSON.parse does."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: bare {c}"))


# ---- the state ---------------------------------------------------------------------------------------------
def test_grad_scaler_round_trips_through_the_json_state(tmp_path):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for _ in range(3):
        scaler.scale(model(torch.randn(2, 3)).sum()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scaler.state_dict()["scale"] == 2048.0 and scaler.state_dict()["_growth_tracker"] == 1  # not the default
    checkpoint.save_state(tmp_path, 3, model, opt, {"step": 3}, scaler=scaler)
    assert json.loads((tmp_path / "state" / "step-00000003" / "trainer.json").read_text())["scaler"]["scale"] == 2048.0
    fresh = torch.amp.GradScaler("cpu")
    twin = torch.nn.Linear(3, 1)
    trainer = checkpoint.load_state(checkpoint.latest_state(tmp_path), twin, torch.optim.SGD(twin.parameters()),
                                    scaler=fresh)
    assert fresh.state_dict() == scaler.state_dict() and "scaler" not in trainer


def test_rng_states_are_restored_exactly(tmp_path):
    """Dropout draws from these: a resumed run must draw what the uninterrupted one would."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters())
    torch.manual_seed(123)
    checkpoint.save_state(tmp_path, 1, model, opt, {"step": 1})
    expected = torch.rand(5)
    torch.manual_seed(999)
    checkpoint.load_state(checkpoint.latest_state(tmp_path), model, opt)
    assert torch.equal(torch.rand(5), expected)


def test_restore_state_skips_a_damaged_state_and_refuses_when_none_is_left(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters())
    for step in (1, 2):
        with torch.no_grad():
            model.weight.fill_(step)
        checkpoint.save_state(tmp_path, step, model, opt, {"step": step, "optimizer_steps": step})
    (tmp_path / "state" / "step-00000002" / "optimizer.safetensors").write_bytes(b"\0" * 8)
    trainer, folder = checkpoint.restore_state(tmp_path, model, opt)
    assert folder.name == "step-00000001" and trainer["step"] == 1 and model.weight.eq(1).all()
    (tmp_path / "state" / "step-00000001" / "trainer.json").write_text("{")
    with pytest.raises(UserError, match="no readable state .*step-00000002.*step-00000001"):
        checkpoint.restore_state(tmp_path, model, opt)
    assert checkpoint.restore_state(tmp_path / "nothing", model, opt) is None


def test_trim_metrics_keeps_the_lines_up_to_the_resumed_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 1, 2, 2, 3)))
    rundir.trim_metrics(log, 2)
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [0, 1, 2, 2]
    rundir.trim_metrics(log, None)  # no state: the run starts again at step 0 and logs its validation again
    assert log.read_text() == ""


def test_patience_stops_early_and_a_resumed_stopped_run_does_not_train_on(data, tiny_model_dir, tmp_path, monkeypatch):
    scores = iter([0.5, 0.4, 0.3, 0.2, 0.1])  # never better than the base model: patience 1 stops at the first check
    monkeypatch.setattr(bge.tasks, "validate", lambda tasks, m, cpu_bf16: ({"ndcg@10": (s := next(scores))}, s))
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "stop", "--patience", "1", "--eval-every", "2",
                    "--max-steps", "10"))
    run = tmp_path / "stop"
    assert [l["step"] for l in lines(run) if "loss" in l] == [1, 2]
    assert json.loads((checkpoint.latest_state(run) / "trainer.json").read_text())["stopped"] is True
    assert json.loads((run / "results.json").read_text())["best_step"] == 0
    train.main(["--resume", str(run)])
    assert [l["step"] for l in lines(run) if "loss" in l] == [1, 2]  # nothing trained after the stop


def test_a_resume_under_another_world_size_is_refused(data, tiny_model_dir, tmp_path):
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "w", "--max-steps", "2", "--eval-every", "100"))
    trainer_json = checkpoint.latest_state(tmp_path / "w") / "trainer.json"
    assert json.loads(trainer_json.read_text())["world"] == 1
    trainer_json.write_text(json.dumps({**json.loads(trainer_json.read_text()), "world": 2}))
    with pytest.raises(UserError, match=r"trained by 2 process\(es\); resume it with 2 .*not 1"):
        train.main(["--resume", str(tmp_path / "w")])
    assert (tmp_path / "w" / "config.json").exists()  # a refused resume deletes nothing


def test_a_resume_with_fewer_steps_keeps_the_schedule_and_more_steps_are_refused(data, tiny_model_dir, tmp_path):
    common = args(data, tiny_model_dir, tmp_path, "--max-steps", "8", "--save-every", "4", "--eval-every", "100",
                  "--warmup-ratio", "0.25")
    train.main([*common, "--run-name", "whole"])
    whole = {l["step"]: l["lr"] for l in lines(tmp_path / "whole") if "lr" in l}
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")  # as if killed after the state of step 4
    state = tmp_path / "cut" / "state"
    shutil.rmtree(state / "step-00000008")
    (state / "latest.json").write_text(json.dumps({"dir": "step-00000004", "step": 4}))
    (tmp_path / "cut" / "results.json").unlink()
    train.main(["--resume", str(tmp_path / "cut"), "--max-steps", "6"])
    cut = {l["step"]: l["lr"] for l in lines(tmp_path / "cut") if "lr" in l}
    assert sorted(cut) == [1, 2, 3, 4, 5, 6] and all(cut[s] == whole[s] for s in cut)  # the 8-step schedule's rates
    assert whole[6] > 0 and json.loads((tmp_path / "cut" / "results.json").read_text())["steps"] == 6
    with pytest.raises(UserError, match="linear schedule was fixed at 8 steps .* 12 would train on"):
        train.main(["--resume", str(tmp_path / "whole"), "--max-steps", "12"])


def test_a_restart_from_step_0_logs_the_step_0_validation_once(data, tiny_model_dir, tmp_path):
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "r", "--max-steps", "2", "--eval-every", "100"))
    run = tmp_path / "r"
    shutil.rmtree(run / "state")  # killed before its first save: the resume starts again at step 0
    (run / "results.json").unlink()
    train.main(["--resume", str(run)])
    assert [l["step"] for l in lines(run) if "val/ndcg@10" in l] == [0, 2]
    assert [l["step"] for l in lines(run) if "loss" in l] == [1, 2]


def test_a_damaged_state_falls_back_to_the_one_before(data, tiny_model_dir, tmp_path, capsys):
    common = args(data, tiny_model_dir, tmp_path, "--max-steps", "4", "--save-every", "1", "--eval-every", "100")
    train.main([*common, "--run-name", "whole"])
    state = tmp_path / "whole" / "state"
    assert sorted(p.name for p in state.iterdir()) == ["latest.json", "step-00000003", "step-00000004"]
    for damage in ("model", "trainer"):
        run = tmp_path / damage
        shutil.copytree(tmp_path / "whole", run)
        (run / "results.json").unlink()
        newest = run / "state" / "step-00000004"
        if damage == "model":
            path = newest / "model.safetensors"
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            (newest / "trainer.json").write_text('{"step": 4, ')
        capsys.readouterr()
        train.main(["--resume", str(run)])
        err = squash(capsys.readouterr().err)
        assert squash("state/step-00000004 is damaged") in err and squash("step-00000003 at step 3") in err
        a, b = load_file(str(tmp_path / "whole" / "final" / "model.safetensors")), load_file(str(run / "final" / "model.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6  # step 4 trained again, to the same weights
    for folder in (tmp_path / "model" / "state").glob("step-*"):
        (folder / "optimizer.safetensors").write_bytes(b"\0")
    with pytest.raises(UserError, match="no readable state"):
        train.main(["--resume", str(tmp_path / "model")])


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path, monkeypatch, tiny_model_dir):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save_state(tmp_path, 1, model, opt, {"step": 1})
    real = checkpoint.save_file

    def full(tensors, filename, metadata=None):  # the disk fills up half-way through the optimizer file
        if "optimizer" in filename:
            Path(filename).write_bytes(b"\0" * 1000)
            enospc()
        real(tensors, filename, metadata)

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(UserError) as e:
        checkpoint.save_state(tmp_path, 2, model, opt, {"step": 2})
    assert "No space left on device" in str(e.value) and "step-00000001 is intact" in str(e.value)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["latest.json", "step-00000001"]
    # an export (best/, final/) and a small file alike
    from bge.embedder import Embedder
    emb = Embedder.load(str(tiny_model_dir), device="cpu")
    monkeypatch.setattr(weights, "save_file", enospc)
    with pytest.raises(UserError, match="cannot write .*best .*No space left on device.*partial copy was removed"):
        emb.save(tmp_path / "best")
    assert not (tmp_path / "best").exists() and not (tmp_path / "best.tmp").exists()
    monkeypatch.setattr(checkpoint.os, "fsync", enospc)
    (tmp_path / "results.json").write_text("old")
    with pytest.raises(UserError, match="cannot write .*results.json .*left as it was"):
        checkpoint.atomic_write_text(tmp_path / "results.json", "new")
    assert (tmp_path / "results.json").read_text() == "old" and not (tmp_path / "results.json.tmp").exists()


# ---- run folders --------------------------------------------------------------------------------------------
def test_one_run_per_folder(data, tiny_model_dir, tmp_path):
    held = rundir.claim(tmp_path / "busy", fresh=True)  # another run is starting in this folder right now
    with pytest.raises(UserError, match="busy is in use by another run"):
        train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "busy", "--max-steps", "1"))
    with pytest.raises(UserError, match="in use by another run"):
        rundir.claim(tmp_path / "busy", fresh=False)
    assert (tmp_path / "busy").is_dir()  # the refused start did not remove the other run's folder
    held.release()
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "busy", "--max-steps", "1", "--eval-every", "100"))
    before = (tmp_path / "busy" / "metrics.jsonl").read_text()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "busy", "--max-steps", "1"))
    assert (tmp_path / "busy" / "metrics.jsonl").read_text() == before  # only a resume trims the log


def test_a_failed_start_removes_the_folder_it_created(data, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--attention flex needs CUDA"):
        train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "flex", "--attention", "flex"))
    assert not (tmp_path / "flex").exists()
    (tmp_path / "empty").mkdir()  # a folder that was there before: emptied again, not removed
    with pytest.raises(UserError, match="--attention flex needs CUDA"):
        train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "empty", "--attention", "flex"))
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_exports_killed_mid_swap_are_recovered(data, tiny_model_dir, tmp_path, capsys):
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "r", "--max-steps", "2", "--eval-every", "100"))
    run = tmp_path / "r"
    best = load_file(str(run / "best" / "model.safetensors"))
    (run / "best").rename(run / "best.old")  # killed between replace_folder's two renames
    shutil.copytree(run / "best.old", run / "best.tmp")
    train.main(["--resume", str(run)])
    assert squash("best/ was missing (an export killed mid-swap); recovered from best.tmp/") in squash(capsys.readouterr().err)
    assert not (run / "best.old").exists() and not (run / "best.tmp").exists()
    assert all(torch.equal(best[k], v) for k, v in load_file(str(run / "best" / "model.safetensors")).items())
    for kept, name in (("best.old", "old"), ("best.tmp", "tmp")):  # one copy only: an old one is complete, a tmp not
        folder = tmp_path / name
        folder.mkdir()
        (folder / kept).mkdir()
        notes = rundir.recover_exports(folder)
        assert (folder / "best").is_dir() == (kept == "best.old") and not (folder / kept).exists(), (name, notes)


# ---- JSON outputs ---------------------------------------------------------------------------------------------
def test_json_outputs_never_hold_a_bare_nan(tiny_model_dir, tmp_path):
    pairs = [(f"a cat number {i} sits", f"a cat {i} is sitting" if i % 2 else f"the stock {i} fell", float(i % 5))
             for i in range(40)]
    data = tmp_path / "sts.jsonl"
    data.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in pairs))
    test = tmp_path / "constant.tsv"  # every gold score the same: Spearman is undefined
    test.write_text("score\tsentence1\tsentence2\n" + "".join(f"3.0\t{a}\t{b}\n" for a, b, _ in pairs[:10]))
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "sts", "--max-steps", "2", "--test", str(test)))
    results = strict_json(tmp_path / "sts" / "results.json")
    assert results["base"]["spearman"] is None and results["change"]["spearman"] is None
    assert results["undefined"]["base.spearman"].startswith("Spearman undefined")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--model", str(tiny_model_dir), "--data", str(test),
                        "--out", str(tmp_path / "eval.json")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = strict_json(tmp_path / "eval.json")
    assert out["models"][0]["metrics"]["spearman"] is None and "Spearman undefined" in json.dumps(out["undefined"])
