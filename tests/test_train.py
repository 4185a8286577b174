"""train.py end to end on a tiny random model: the run folder, exact resume after SIGKILL, atomic state,
and bad input that never shows a traceback."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import squash, start_and_kill
from bge import checkpoint
from bge.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "bike_repair.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The first 60 lines of the example file: 42 train / 9 val / 9 test queries."""
    path = tmp_path_factory.mktemp("data") / "bikes.jsonl"
    path.write_text("".join(EXAMPLE.read_text().splitlines(keepends=True)[:60]))
    return path


def args(data, model, out, *extra):
    return ["--data", str(data), "--model", str(model), "--out-dir", str(out), "--batch-size", "8",
            "--group-size", "2", "--max-passage-length", "48", "--max-query-length", "16", "--eval-batch-size", "64",
            "--lr", "1e-3", *extra]


def run_cli(*argv, **kw):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True, text=True, **kw)


def test_run_folder_holds_everything(data, tiny_model_dir, tmp_path):
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "r", "--epochs", "2"))
    run = tmp_path / "r"
    for f in ("config.json", "command.txt", "git.txt", "split.json", "metrics.jsonl", "results.json",
              "best/model.safetensors", "best/modules.json", "final/model.safetensors", "state/latest.json"):
        assert (run / f).exists(), f
    split = json.loads((run / "split.json").read_text())
    parts = split["tasks"]["retrieval"]
    assert split["format"] == 2 and (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (42, 9, 9)
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 12 and results["train_queries"] == 42  # 6 batches of 8 per epoch
    assert set(results["base"]) == set(results["fine_tuned"]) and "ndcg@10" in results["change"]
    assert results["test_queries"] == 9
    # base and best/ were validated on the same corpus: their test encodes no passage again (bge.evaluation.CorpusCache)
    assert results["test_passages_encoded"] == 0 and results["test_corpus"] > 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 13))
    assert [l["step"] for l in lines if "val/ndcg@10" in l] == [0, 6, 12]
    assert json.loads((run / "config.json").read_text())["batch_size"] == 8


def test_killed_run_resumes_to_identical_weights(data, tiny_model_dir, tmp_path):
    common = args(data, tiny_model_dir, tmp_path, "--max-steps", "24", "--save-every", "1", "--eval-every", "12")
    whole = run_cli(*common, "--run-name", "whole")
    assert whole.returncode == 0, whole.stderr
    killed_at = start_and_kill([sys.executable, str(REPO / "train.py"), *common, "--run-name", "killed"],
                               tmp_path / "killed", at_step=5, cwd=REPO)
    assert 5 <= killed_at < 24
    resumed = run_cli("--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {killed_at}" in " ".join(resumed.stderr.split())  # rich wraps long paths
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(1, 25))  # nothing logged twice, nothing lost


def test_crash_while_writing_state_leaves_the_previous_state_readable(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    checkpoint.save_state(tmp_path, 1, model, opt, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}

    real_save = checkpoint.save_file

    def torn_write(tensors, filename, metadata=None):  # killed halfway through the optimizer file
        if "optimizer" in filename:
            Path(filename).write_bytes(b"\x00" * 10)
            raise KeyboardInterrupt("killed")
        real_save(tensors, filename, metadata)

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(checkpoint, "save_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_state(tmp_path, 2, model, opt, {"step": 2})
    monkeypatch.undo()
    state = checkpoint.latest_state(tmp_path)
    assert state.name == "step-00000001"
    fresh = torch.nn.Linear(4, 4)
    trainer = checkpoint.load_state(state, fresh, torch.optim.AdamW(fresh.parameters()))
    assert trainer["step"] == 1 and all(torch.equal(fresh.state_dict()[k], before[k]) for k in before)
    checkpoint.save_state(tmp_path, 3, model, opt, {"step": 3})  # the next save cleans up the torn folder
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["latest.json", "step-00000001", "step-00000003"]
    checkpoint.save_state(tmp_path, 4, model, opt, {"step": 4})  # and keeps the newest two
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["latest.json", "step-00000003", "step-00000004"]


def test_optimizer_state_round_trips_exactly(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    checkpoint.save_state(tmp_path, 3, model, opt, {"step": 3})
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, fused=True)
    checkpoint.load_state(checkpoint.latest_state(tmp_path), twin, twin_opt)
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (twin, twin_opt)):
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("content,message", [
    ('{"query": "q", "pos": ["p"]}\n{"query": "q2"}\n', ":2: missing field 'pos'"),
    ('{"query": "q", "pos": ["p"]}\nnot json\n', ":2: invalid JSON"),
    ('{"query": "", "pos": ["p"]}\n', ":1: field 'query' is empty"),
])
def test_bad_input_is_an_error_line_not_a_traceback(tmp_path, tiny_model_dir, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    r = run_cli(*args(bad, tiny_model_dir, tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: {bad}{message}" in r.stderr.replace("\n", "")


def test_cli_usage_errors(tmp_path, tiny_model_dir):
    r = run_cli("--data", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--learning-rate", "1")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
    r = run_cli("--resume", str(tmp_path))
    assert r.returncode == 2 and "not a run folder" in r.stderr


def test_repeated_nan_loss_stops_with_a_clear_message(data, tiny_model_dir, tmp_path, monkeypatch):
    import bge.tasks
    real = bge.tasks.info_nce
    monkeypatch.setattr(bge.tasks, "info_nce", lambda *a, **k: (real(*a, **k)[0] * float("nan"), torch.tensor(0.0)))
    with pytest.raises(UserError, match="NaN/inf for 3 steps in a row"):
        train.main(args(data, tiny_model_dir, tmp_path, "--max-bad-steps", "3", "--run-name", "nan"))
    lines = [json.loads(l, parse_constant=pytest.fail) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()
             if "loss" in l]
    assert [l["skipped"] for l in lines] == [True, True]  # the third one raised before it was logged
    assert lines[0]["loss"] is None and lines[0]["undefined"] == {"loss": "undefined (NaN or infinite)"}  # no bare NaN


# ---- teacher scores, Matryoshka and the forgetting guard --------------------------------------------------
@pytest.fixture(scope="module")
def scored(data, tmp_path_factory):
    """The data with (made-up) teacher scores on every line, and a small STS probe."""
    folder = tmp_path_factory.mktemp("scored")
    rng = torch.Generator().manual_seed(0)
    lines = []
    for line in data.read_text().splitlines():
        obj = json.loads(line)
        obj["pos_scores"] = torch.rand(len(obj["pos"]), generator=rng).tolist()
        obj["neg_scores"] = torch.rand(len(obj["neg"]), generator=rng).tolist()
        lines.append(json.dumps(obj) + "\n")
    (folder / "scored.jsonl").write_text("".join(lines))
    pairs = [json.loads(l) for l in EXAMPLE.read_text().splitlines()[100:130]]
    (folder / "probe.tsv").write_text("score\tsentence1\tsentence2\n" + "".join(
        f"{i % 5}\t{p['query']}\t{p['pos'][0] if i % 2 else p['neg'][0]}\n" for i, p in enumerate(pairs)))
    return folder


def first_loss(run: Path) -> float:
    return next(json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in l)


def test_kd_and_matryoshka_add_their_terms_to_the_same_first_step(scored, tiny_model_dir, tmp_path):
    common = args(scored / "scored.jsonl", tiny_model_dir, tmp_path, "--max-steps", "1", "--val-ratio", "0",
                  "--test-ratio", "0")
    train.main([*common, "--run-name", "plain"])
    train.main([*common, "--run-name", "kd", "--kd-weight", "1", "--kd-temperature", "0.05"])
    train.main([*common, "--run-name", "mrl", "--matryoshka-dims", "16,8"])
    plain, kd, mrl = (first_loss(tmp_path / n) for n in ("plain", "kd", "mrl"))
    assert kd > plain + 1e-4  # same weights and batch: the KL term is all that differs, and it is positive
    assert mrl > plain + 0.5  # two more InfoNCE terms of order log(batch)
    with pytest.raises(UserError, match="--kd-weight needs hard negatives with teacher scores"):
        train.main(args(EXAMPLE, tiny_model_dir, tmp_path, "--kd-weight", "1", "--run-name", "nokd"))
    with pytest.raises(UserError, match="--matryoshka-dims 64"):
        train.main([*common, "--run-name", "bad-mrl", "--matryoshka-dims", "64"])


def test_probe_at_each_validation_and_merge_sweep_exports_the_chosen_mix(scored, tiny_model_dir, tmp_path):
    from bge.embedder import Embedder
    from bge.merge import merge_state_dicts
    train.main(args(scored / "scored.jsonl", tiny_model_dir, tmp_path, "--run-name", "guard", "--epochs", "1",
                    "--general-probe", str(scored / "probe.tsv"), "--merge-sweep", "0.5,1", "--probe-tolerance", "1"))
    run = tmp_path / "guard"
    validations = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val/ndcg@10" in l]
    assert [v["step"] for v in validations] == [0, 6] and all("probe/spearman" in v for v in validations)
    results = json.loads((run / "results.json").read_text())
    sweep = results["merge_sweep"]
    assert set(sweep) == {"0", "0.5", "1"} and all("probe/spearman" in s for s in sweep.values())
    assert sweep["0"] == {k: v for k, v in validations[0].items() if k != "step"}  # the base model, from step 0
    ratio = results["merge_ratio"]  # tolerance 1: the best validation score wins
    assert sweep[f"{ratio:g}"]["val/ndcg@10"] == max(s["val/ndcg@10"] for s in sweep.values())
    for name in ("base", "fine_tuned", "merged"):
        assert {"ndcg@10", "probe/spearman", "probe/pearson"} <= set(results[name])
    assert results["base"]["probe/spearman"] == pytest.approx(validations[0]["probe/spearman"], abs=1e-9)
    base = Embedder.load(str(tiny_model_dir), device="cpu").model.state_dict()
    expected = merge_state_dicts(base, Embedder.load(str(run / "best"), device="cpu").model.state_dict(), ratio)
    exported = Embedder.load(str(run / "merged"), device="cpu").model.state_dict()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    with pytest.raises(UserError, match="not both"):
        train.main(args(scored / "scored.jsonl", tiny_model_dir, tmp_path, "--merge-sweep", "0.5", "--merge-ratio", "0.5"))


# ---- speed paths: the varlen layout, late read-back, the phase timing ---------------------------------------------
def test_varlen_bucketed_run_with_late_read_back_trains_like_the_padded_run(data, tiny_model_dir, tmp_path):
    # dropout off and fp32, so the two layouts compute the same function; the varlen run reads its losses back every
    # 3 steps, so each deferred line must still land on its own step
    common = args(data, tiny_model_dir, tmp_path, "--max-steps", "5", "--precision", "fp32", "--hidden-dropout", "0",
                  "--attention-dropout", "0")
    train.main([*common, "--run-name", "padded"])
    train.main([*common, "--run-name", "varlen", "--packed", "--attention", "varlen", "--token-bucket", "64",
                "--log-every", "3"])
    lines = {n: [json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines() if "loss" in l]
             for n in ("padded", "varlen")}
    assert [l["step"] for l in lines["varlen"]] == [l["step"] for l in lines["padded"]] == [1, 2, 3, 4, 5]
    for a, b in zip(lines["padded"], lines["varlen"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and a["acc"] == b["acc"] and not b["skipped"]
    assert len({l["loss"] for l in lines["padded"]}) == 5  # the steps differ, so a misplaced line would show
    # weights: Adam turns rounding-level differences in near-zero gradients into whole steps (the padded and the
    # existing packed layout differ by 2.5e-4 element-wise after these 5 steps too), so compare the whole move
    flat = lambda folder: torch.cat([t.flatten() for _, t in sorted(load_file(str(folder / "model.safetensors")).items())])
    base, padded, varlen = flat(tiny_model_dir), flat(tmp_path / "padded" / "final"), flat(tmp_path / "varlen" / "final")
    assert (padded - varlen).norm() <= 0.02 * (padded - base).norm()
    timing = json.loads((tmp_path / "varlen" / "results.json").read_text())["timing"]
    phases = {"setup", "train", "validation", "export", "checkpoint", "test"}
    assert phases <= set(timing) and all(timing[p] > 0 for p in phases) and timing["peak_rss_gb"] > 0.1
    assert timing["peak_rss_phase"] in phases
    assert sum(timing[p] for p in phases) == pytest.approx(timing["total"], abs=0.02)  # every second once


def test_layer_lr_decay_moves_the_lower_layers_less(data, tiny_model_dir, tmp_path):
    # Adam's first step moves every weight whose gradient is not ~0 by its group's rate, so each tensor's largest move
    # is that rate: the top layer at --lr, each layer below at half the one above, the embeddings lowest
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "llrd", "--max-steps", "1", "--warmup-ratio", "0",
                    "--weight-decay", "0", "--clip-grad", "0", "--precision", "fp32", "--layer-lr-decay", "0.5"))
    base, after = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(tmp_path / "llrd/final/model.safetensors"))
    move = {k: (after[k] - base[k]).abs().max().item() / 1e-3 for k in base}
    layers = 1 + max(int(k.split("encoder.layer.")[1].split(".")[0]) for k in base if "encoder.layer." in k)
    depth = lambda k: int(k.split("encoder.layer.")[1].split(".")[0]) + 1 if "encoder.layer." in k else 0
    for k in base:  # (a key bias adds one constant to all of a query's scores: softmax gives it no gradient)
        if not k.endswith("key.bias"):
            assert move[k] == pytest.approx(0.5 ** (layers - depth(k)), rel=0.02), k


def test_nan_guard_with_late_read_back(data, tiny_model_dir, tmp_path, monkeypatch):
    import bge.tasks
    real = bge.tasks.info_nce
    monkeypatch.setattr(bge.tasks, "info_nce", lambda *a, **k: (real(*a, **k)[0] * float("nan"), torch.tensor(0.0)))
    with pytest.raises(UserError, match=r"NaN/inf for 3 steps in a row \(step 3\)"):
        train.main(args(data, tiny_model_dir, tmp_path, "--max-bad-steps", "3", "--run-name", "nan", "--log-every", "4"))
    lines = [json.loads(l) for l in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert [l["skipped"] for l in lines] == [True, True]


def test_speed_flags_need_their_layout(data, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--attention varlen .* pass --packed"):
        train.main(args(data, tiny_model_dir, tmp_path, "--attention", "varlen"))
    with pytest.raises(UserError, match="--token-bucket pads the varlen layout"):
        train.main(args(data, tiny_model_dir, tmp_path, "--packed", "--token-bucket", "512"))
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def test_stopwatch_charges_each_second_to_one_phase_and_the_peak_rss_to_the_phase_that_rose_last(monkeypatch):
    from bge import runs
    now = iter(range(100))
    monkeypatch.setattr(runs.time, "perf_counter", lambda: float(next(now)))
    # the kernel's high-water mark as each phase ends: it rises in train (outside the validation inside it), stays in
    # validation, rises once more in export, which sets the peak
    rss = iter([1e9, 1e9, 2e9, 2e9, 3e9, 3e9, 3e9, 3e9])
    monkeypatch.setattr(runs, "peak_rss", lambda: next(rss))
    clock = runs.Stopwatch()  # t=0: setup from here
    clock.enter("train")  # t=1
    with clock("validation"):  # t=2
        with clock("export"):  # t=3
            pass  # t=4: back to validation
    clock.enter("test")  # t=5 back to train; t=6: test from here
    report = clock.report()  # t=7
    assert {k: report[k] for k in ("setup", "train", "validation", "export", "test")} == {
        "setup": 1, "train": 2, "validation": 2, "export": 1, "test": 1}
    assert report["total"] == 7 and report["peak_rss_gb"] == 3 and report["peak_rss_phase"] == "export"


def test_too_little_data_is_said_up_front_and_in_results(tiny_model_dir, tmp_path, capsys):
    small = tmp_path / "small.jsonl"  # 3 queries: 15% of them rounds to no validation and no test query
    small.write_text("".join(EXAMPLE.read_text().splitlines(keepends=True)[:3]))
    train.main(args(small, tiny_model_dir, tmp_path, "--run-name", "small", "--max-steps", "1"))
    err = " ".join(capsys.readouterr().err.split())
    assert "retrieval: no validation set (0.15 of its 3 training items rounds to none" in err
    assert "retrieval: no test set" in err and err.index("no test set") < err.index("wrote")
    results = json.loads((tmp_path / "small" / "results.json").read_text())
    assert "rounds to none" in results["no_test_set"]["retrieval"] and "base" not in results
    with pytest.raises(UserError, match="--patience stops when validation stops improving; this run has no validation"):
        train.main(args(small, tiny_model_dir, tmp_path, "--run-name", "patience", "--patience", "2"))
    with pytest.raises(UserError, match="--merge-sweep chooses a mix on the validation set"):
        train.main(args(small, tiny_model_dir, tmp_path, "--run-name", "sweep", "--merge-sweep", "0.5"))


def comparable(results: dict) -> dict:
    """results.json less what names the run or times it."""
    out = {k: v for k, v in results.items() if k not in ("run", "timing", "train_seconds")}
    out["config"] = {k: v for k, v in results["config"].items() if k != "run_name"}
    return out


def test_the_base_is_tested_with_its_own_query_instruction_not_the_runs(data, tiny_model_dir, tmp_path):
    # a --query-prompt the base was not trained with is part of the recipe: the base row is the model as it is used
    # without this run, so it equals a plain run's base row, while the fine-tuned model keeps the run's instruction
    # (a retrieval probe, whose queries take the instruction: the base's probe row is not step 0's validation, which
    # ran with the run's instruction)
    common = args(data, tiny_model_dir, tmp_path, "--max-steps", "1", "--explain", "0", "--general-probe", str(EXAMPLE))
    train.main([*common, "--run-name", "plain"])
    train.main([*common, "--run-name", "prompted", "--query-prompt", "query: "])
    plain, prompted = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("plain", "prompted"))
    assert "probe/ndcg@10" in plain["base"]
    assert prompted["base"] == plain["base"] and prompted["base_query_prompt"] == "" and "base_query_prompt" not in plain
    assert prompted["fine_tuned"] != plain["fine_tuned"]
    st = json.loads((tmp_path / "prompted" / "best" / "config_sentence_transformers.json").read_text())
    assert st["prompts"]["query"] == "query: "


def unstated(model_dir, folder):
    """A copy of a model folder whose config_sentence_transformers.json names no instruction (all-MiniLM-L6-v2's)."""
    import shutil

    shutil.copytree(model_dir, folder)
    st = folder / "config_sentence_transformers.json"
    st.write_text(json.dumps({k: v for k, v in json.loads(st.read_text()).items() if k != "prompts"}))
    return folder


@pytest.mark.parametrize("flag, stated, retrieval, arch, trained_with", [
    ("auto", None, True, "bert", "query: "),  # nothing stated: E5's prefix (README: +1.7 nDCG@10 on SciFact)
    ("auto", None, False, "bert", ""),  # STS or classification alone: queries are not what is trained
    ("auto", None, True, "bilstm", ""),  # a new BiLSTM: not measured, so as before
    ("auto", "", True, "bert", ""),  # a folder that says it takes no instruction keeps none
    ("auto", "Represent: ", True, "bert", "Represent: "),  # nor is its own one replaced
    ("", None, True, "bert", ""),  # the flag wins
    ("search_query: ", "Represent: ", True, "bert", "search_query: "),
])
def test_auto_query_prompt_is_the_models_own_or_e5s_prefix(tiny_model_dir, tmp_path, flag, stated, retrieval, arch,
                                                            trained_with):
    from bge import TrainConfig, prepare

    folder = unstated(tiny_model_dir, tmp_path / "model")
    if stated is not None:
        st = folder / "config_sentence_transformers.json"
        st.write_text(json.dumps({"prompts": {"query": stated}}))
    cfg = TrainConfig(data="unused.jsonl", model=str(folder), query_prompt=flag, arch=arch)
    embedder, own, _ = prepare.load_student(cfg, torch.device("cpu"), retrieval=retrieval)
    assert (embedder.tokenizer.query_prompt, own) == (trained_with, stated or "")


@pytest.mark.parametrize("flag, prompts, own, trained_with", [
    ("auto", {}, "", ""),  # most models (BGE, all-MiniLM-L6-v2) state none: passages stay bare
    ("auto", {"passage": "passage: "}, "passage: ", "passage: "),  # a model's own (E5's) is kept
    ("", {"document": "search_document: "}, "search_document: ", ""),  # the flag wins
    ("passage: ", {"document": "search_document: "}, "search_document: ", "passage: "),
])
def test_auto_passage_prompt_is_the_models_own(tiny_model_dir, tmp_path, flag, prompts, own, trained_with):
    from bge import TrainConfig, prepare

    folder = unstated(tiny_model_dir, tmp_path / "model")
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    cfg = TrainConfig(data="unused.jsonl", model=str(folder), passage_prompt=flag)
    embedder, _, base_own = prepare.load_student(cfg, torch.device("cpu"), retrieval=True)
    assert (embedder.tokenizer.passage_prompt, base_own) == (trained_with, own)


def test_best_at_step_0_is_the_base_with_its_own_instruction(data, tiny_model_dir, tmp_path, monkeypatch):
    # where no trained step beats the start of training on validation (PubMedQA), best/ is the base as its users have
    # it: not the base with an instruction it never learnt, which the test would score below the base; validation
    # itself judges every step with the run's instruction
    from bge import tasks as task_types

    real, seen = task_types.validation_scores, []

    def validation_scores(tasks, embedder, cpu_bf16, probe):
        seen.append(embedder.tokenizer.query_prompt)
        scores = real(tasks, embedder, cpu_bf16, probe)
        return {**scores, "val/score": 1.0 if len(seen) == 1 else 0.5}  # the base wins

    monkeypatch.setattr(task_types, "validation_scores", validation_scores)
    folder = unstated(tiny_model_dir, tmp_path / "model")
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"passage": "own: "}}))
    train.main(args(data, folder, tmp_path, "--max-steps", "2", "--eval-every", "1", "--explain", "0",
                    "--run-name", "r", "--general-probe", str(EXAMPLE),  # a probe whose queries take the instruction
                    "--passage-prompt", "passage: "))
    assert seen == ["query: ", "query: ", "query: "]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["best_step"] == 0 and results["fine_tuned"] == results["base"]
    assert "base_query_prompt" not in results and "base_passage_prompt" not in results  # best/ is the base
    st = json.loads((tmp_path / "r" / "best" / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": "", "document": "own: "}
    st = json.loads((tmp_path / "r" / "final" / "config_sentence_transformers.json").read_text())
    assert st["prompts"] == {"query": "query: ", "document": "passage: "}


def test_passage_prompt_is_trained_and_exported_while_the_base_keeps_its_own(data, tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    # best/ and final/ say "document": the run's passage instruction, which sentence-transformers' encode_document
    # applies; every validation takes it (step 0 is where training starts); the base's test row is the base as its
    # users have it, with its own (E5's "passage")
    from bge import tasks as task_types

    real, seen = task_types.validation_scores, []

    def validation_scores(tasks, embedder, cpu_bf16, probe):
        seen.append(embedder.tokenizer.passage_prompt)
        return {**real(tasks, embedder, cpu_bf16, probe), "val/score": float(len(seen))}  # the last step wins

    monkeypatch.setattr(task_types, "validation_scores", validation_scores)
    folder = unstated(tiny_model_dir, tmp_path / "model")
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"query": "", "passage": "own: "}}))
    train.main(args(data, folder, tmp_path, "--max-steps", "2", "--eval-every", "1", "--explain", "0",
                    "--run-name", "r", "--passage-prompt", "passage: "))
    assert seen == ["passage: ", "passage: ", "passage: "]
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["best_step"] == 2 and results["base_passage_prompt"] == "own: " and "base_query_prompt" not in results
    for role in ("best", "final"):
        st = json.loads((tmp_path / "r" / role / "config_sentence_transformers.json").read_text())
        assert st["prompts"] == {"query": "", "document": "passage: "}


def tiny_config(data, model, out, **kw):
    """The Python API's config for what `args` gives the CLI (the tiny model's sizes)."""
    from bge import TrainConfig

    return TrainConfig(data=str(data), model=str(model), out_dir=str(out), batch_size=8, group_size=2,
                       max_passage_length=48, max_query_length=16, eval_batch_size=64, **kw)


def test_python_api_gives_the_clis_results(data, tiny_model_dir, tmp_path):
    from bge import TrainConfig, train as train_fn

    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "cli", "--max-steps", "4", "--eval-every", "2"))
    cfg = tiny_config(data, tiny_model_dir, tmp_path, lr=1e-3, run_name="api", max_steps=4, eval_every=2)
    result = train_fn(cfg)
    assert result.run_dir == tmp_path / "api"
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert result.results == json.loads((tmp_path / "api" / "results.json").read_text())
    assert comparable(result.results) == comparable(cli)
    a = load_file(str(tmp_path / "cli" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "api" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "bge-train --data" in (tmp_path / "api" / "command.txt").read_text()
    with pytest.raises(UserError, match=r"temperature must be in \(0, inf\), got -1.0"):  # before any folder is made
        train_fn(TrainConfig(data=str(data), model=str(tiny_model_dir), out_dir=str(tmp_path), run_name="bad",
                             temperature=-1.0))
    assert not (tmp_path / "bad").exists()


def test_returned_results_are_what_results_json_says(data, tiny_model_dir, tmp_path, monkeypatch):
    """Whatever shape a field is built in (a tuple, a NaN), train() returns what the file says."""
    from bge import train as train_fn
    from bge.runs import Stopwatch

    report = Stopwatch.report
    monkeypatch.setattr(Stopwatch, "report", lambda self: {**report(self), "odd": (1, float("nan"))})
    cfg = tiny_config(data, tiny_model_dir, tmp_path, max_steps=2, run_name="r")
    results = train_fn(cfg).results
    assert results["timing"]["odd"] == [1, None] and results["undefined"] == {"timing.odd.1": "undefined (NaN or infinite)"}
    assert results == json.loads((tmp_path / "r" / "results.json").read_text())


def test_two_files_each_batch_from_one_and_no_in_batch_neg_by_name(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import bge.tasks

    lines = EXAMPLE.read_text().splitlines(keepends=True)
    first, second = tmp_path / "repairs.jsonl", tmp_path / "more_no_in_batch_neg.jsonl"
    first.write_text("".join(lines[:40]))
    second.write_text("".join(lines[40:80]))
    files, flags, current = [], [], []
    real_batch, real_loss = bge.tasks.RetrievalTask.micro_batch, bge.tasks.info_nce

    def spy_batch(self, indices, *a, **kw):  # built ahead of its step (bge.batching.Prefetcher): tag its loss
        these = frozenset(self.train[self.items[k][0]].file for k in indices)
        files.append(these)
        inputs, loss_fn = real_batch(self, indices, *a, **kw)
        return inputs, lambda emb: (current.append(these), loss_fn(emb))[1]

    def spy_loss(*a, in_batch=True, **kw):  # what the InfoNCE of each batch was told
        flags.append((current[-1], in_batch))
        return real_loss(*a, in_batch=in_batch, **kw)

    monkeypatch.setattr(bge.tasks.RetrievalTask, "micro_batch", spy_batch)
    monkeypatch.setattr(bge.tasks, "info_nce", spy_loss)
    argv = args(first, tiny_model_dir, tmp_path, "--run-name", "two", "--epochs", "1", "--threads", "1")
    argv[1:2] = [str(first), str(second)]
    train.main(argv)
    err = squash(capsys.readouterr().err)
    assert "repairs.jsonl:40retrievalline(s)" in err and "more_no_in_batch_neg.jsonl:40retrievalline(s)" in err
    assert files and all(len(f) == 1 for f in files)  # every micro-batch holds one file's queries
    assert {next(iter(f)) for f in files} == {0, 1}  # and both files are trained on
    assert {(next(iter(f)), flag) for f, flag in flags} == {(0, True), (1, False)}
    split = json.loads((tmp_path / "two" / "split.json").read_text())["tasks"]["retrieval"]
    ids = [i for part in split.values() for i in part]
    assert len(ids) == len(set(ids)) == 80 and {i.split(":")[0] for i in ids} == {"0", "1"}
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["test_queries"] > 0 and "ndcg@10" in results["change"]


def test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly(tiny_model_dir, tmp_path,
                                                                                          monkeypatch):
    # --grad-cache -1: 32-text chunks for a CPU micro-batch of over AUTO_TOKENS padded tokens (each group padded to
    # its longest), one plain forward and backward otherwise, never on CUDA; an explicit value is used as given.
    # Training in fp32, whose activations are twice bf16's: 16-text chunks over a budget of its own (half of bf16's)
    import bge.config
    import bge.training
    from bge.embedder import native_cpu_bf16

    inputs = {"q": [[1] * 10] * 4, "p": [[1] * 100, [1] * 5]}  # 4 x 10 + 2 x 100 = 240 padded tokens
    for budget, device, given, before, expected in ((239, "cpu", -1, False, 32), (240, "cpu", -1, False, 0),
                                                    (240, "cpu", -1, True, 32), (239, "cuda", -1, False, 0),
                                                    (240, "cuda", -1, True, 0), (239, "cpu", 0, True, 0),
                                                    (10**6, "cpu", 7, False, 7)):
        monkeypatch.setattr(bge.config, "AUTO_TOKENS", budget)
        assert bge.config.grad_cache_chunk(given, device, inputs, before) == expected, (budget, device, given, before)
    monkeypatch.setattr(bge.config, "AUTO_TOKENS", 10**6)  # the bf16 budget plays no part in fp32
    for budget, device, given, before, expected in ((239, "cpu", -1, False, 16), (240, "cpu", -1, False, 0),
                                                    (240, "cpu", -1, True, 16), (239, "cuda", -1, False, 0),
                                                    (10**6, "cpu", 7, False, 7)):
        monkeypatch.setattr(bge.config, "AUTO_TOKENS_FP32", budget)
        got = bge.config.grad_cache_chunk(given, device, inputs, before, fp32=True)
        assert got == expected, (budget, device, given, before, "fp32")

    seen, real = [], bge.training.forward_backward

    def spy(embed, inputs, loss_fn, *, chunk_size, **kw):
        seen.append(chunk_size)
        return real(embed, inputs, loss_fn, chunk_size=chunk_size, **kw)

    monkeypatch.setattr(bge.training, "forward_backward", spy)
    auto = 32 if native_cpu_bf16() else 16  # --precision auto trains in fp32 on a CPU without native bf16
    for name, budget, extra, expected in (("big", 0, [], auto), ("small", 10**9, [], 0),
                                          ("off", 0, ["--grad-cache", "0"], 0), ("fixed", 0, ["--grad-cache", "5"], 5),
                                          ("fp32", 0, ["--precision", "fp32"], 16)):
        monkeypatch.setattr(bge.config, "AUTO_TOKENS", budget)
        monkeypatch.setattr(bge.config, "AUTO_TOKENS_FP32", budget)
        seen.clear()
        train.main(args(EXAMPLE, tiny_model_dir, tmp_path, "--run-name", name, "--max-steps", "2", "--threads", "1",
                        *extra))
        assert seen and set(seen) == {expected}, name

    # a run that chunked keeps chunking: only the first micro-batch is over the budget here (as a full batch is and an
    # epoch's last, smaller one is not), yet every later one goes through GradCache too
    calls = []

    def budget_then_none(*a, **kw):
        for name in ("AUTO_TOKENS", "AUTO_TOKENS_FP32"):  # undone after the test
            monkeypatch.setattr(bge.config, name, 0 if not calls else 10**9)
        calls.append(1)
        return bge.config.grad_cache_chunk(*a, **kw)

    monkeypatch.setattr(bge.training, "grad_cache_chunk", budget_then_none)
    seen.clear()
    train.main(args(EXAMPLE, tiny_model_dir, tmp_path, "--run-name", "sticky", "--max-steps", "3", "--threads", "1"))
    assert len(seen) == 3 and set(seen) == {auto}


def test_best_models_corpus_encoding_outlives_later_validations(data, tiny_model_dir, tmp_path, monkeypatch):
    # validation says step 6 is best and steps 12 and 18 are worse: their embeddings leave the memory, step 6's stay,
    # and the test encodes no passage (the memory's 2 latest would have been steps 12 and 18)
    import bge.tasks

    real, told = bge.tasks.RetrievalTask.validate, iter([0.1, 0.9, 0.5, 0.4])
    monkeypatch.setattr(bge.tasks.RetrievalTask, "validate", lambda *a: real(*a) | {"ndcg@10": next(told)})
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "r", "--epochs", "3"))
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "val/ndcg@10" in l] == [0, 6, 12, 18]
    assert results["best_step"] == 6 and results["test_passages_encoded"] == 0 and results["test_corpus"] > 0
