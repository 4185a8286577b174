"""The pieces of the fine-tuning recipe that issue 15 measured: every (query, positive) pair as an item, pseudo-pairs
from unlabeled passages, hard negatives mined by the base model inside train.py (cached), the split fixed across
training seeds, and the quality benchmark's plumbing (both sides trained and scored on one split)."""
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import train
from bge.batching import Sampler, make_batch, normalise
from bge.config import parse_args
from bge.data import Example
from bge.errors import UserError
from bge.tasks import TaskSampler, labelled, load_tasks
from bge.unlabeled import pseudo_pairs, sentences

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["brake pads", "chain wear", "tubeless sealant", "spoke tension", "bottom bracket", "derailleur hanger",
          "tyre pressure", "headset bearings", "disc rotors", "cable stretch", "saddle height", "wheel truing"]


def write_beir(folder: Path) -> Path:
    """A small invented BEIR folder: 36 titled passages of four sentences, 24 queries with one relevant passage."""
    (folder / "qrels").mkdir(parents=True)
    docs, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for i in range(36):
        t = TOPICS[i % 12]
        docs.append({"_id": f"d{i}", "title": f"Notes on {t} for touring bikes, part {i}",
                     "text": f"Check the {t} every {i + 2} rides. Worn {t} cost watts and safety. "
                             f"Replace the {t} when the gauge reads {i % 5}. Workshop case {i} shows why it matters."})
    for i in range(24):
        queries.append({"_id": f"q{i}", "text": f"how often should I look at the {TOPICS[i % 12]} (case {i})"})
        qrels.append(f"q{i}\td{i}\t1")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "train.tsv").write_text("\n".join(qrels) + "\n")
    return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("data") / "bikes")


def args(data, model, out, *extra):
    return ["--data", str(data), "--model", str(model), "--out-dir", str(out), "--batch-size", "4",
            "--max-passage-length", "48", "--max-query-length", "16", "--eval-batch-size", "64", "--lr", "1e-3",
            "--explain", "0", *extra]


# ---- every (query, positive) pair ---------------------------------------------------------------------------
def test_make_batch_uses_the_named_positive_and_masks_the_others():
    ex = [Example("q0", ["a", "b", "c"], ["n1", "n2"]), Example("q1", ["d"], [])]
    b = make_batch(ex, [0, 1], group_size=2, seed=0, epoch=0, positives=[2, 0])
    assert b.passages[0] == "c" and b.passages[2] == "d"
    assert b.query_pos_hashes.shape == (2, 3)  # every positive of q0 is known to the false-negative mask
    drawn = {make_batch(ex, [0], group_size=1, seed=0, epoch=e).passages[0] for e in range(30)}
    assert drawn == {"a", "b", "c"}  # without `positives` one is drawn per epoch, each in turn


def test_positives_all_makes_every_pair_an_item_once_per_epoch(tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [{"query": f"query {i}", "pos": [f"passage {i} {k}" for k in range(1 + i % 3)]} for i in range(30)]
    data.write_text("".join(json.dumps(l) + "\n" for l in lines))
    for mode in ("one", "all"):
        cfg, _ = parse_args(["--data", str(data), "--positives", mode, "--out-dir", str(tmp_path)])
        tasks, _ = load_tasks(cfg, tmp_path / mode, write=False)
        task = tasks["retrieval"]
        want = [(i, j) for i, ex in enumerate(task.train) for j in range(len(ex.pos))] if mode == "all" else \
            [(i, None) for i in range(len(task.train))]
        assert task.items == want and len(task.anchors()) == len(want)
        sampler = TaskSampler(tasks, 4, seed=1)
        for epoch in range(2):
            drawn = Counter()
            for step in range(epoch * len(sampler), (epoch + 1) * len(sampler)):
                _, _, indices = sampler.batch(step)
                queries = [task.train[task.items[k][0]].query for k in indices]
                assert len(set(queries)) == len(queries)  # never one query twice in a batch
                drawn.update(indices)
            assert sorted(drawn) == list(range(len(want))) and set(drawn.values()) == {1}  # each item once an epoch


# ---- pseudo-pairs from unlabeled passages ----------------------------------------------------------------------
def test_sentences_and_pseudo_pairs():
    assert sentences("One two three four. Five six seven eight! (Nine) ten? 10 apples.") == [
        "One two three four.", "Five six seven eight!", "(Nine) ten?", "10 apples."]
    passages = [("A useful title with words", "First sentence is long enough. Second one is long too. Third ends it here."),
                ("", "Only two sentences here are given. The second one is here."),
                ("Short", "Body text with many words in it. More words in a second sentence. And a third one now.")]
    pairs = pseudo_pairs(passages, ("title", "ict"), seed=0)
    kinds = Counter(ex.qid.split(":")[0] for ex in pairs)
    assert kinds == {"title": 1, "ict": 2}  # no title pair for '' or 'Short'; no ICT pair with two sentences
    title = next(ex for ex in pairs if ex.qid == "title:0")
    assert title.query == passages[0][0] and title.pos == [passages[0][1]]
    for ex in (e for e in pairs if e.qid.startswith("ict")):
        n = int(ex.qid.split(":")[1])
        assert ex.query in passages[n][1] and ex.query not in ex.pos[0]  # the sentence is taken out of its context
        assert len(ex.pos[0]) > len(passages[n][0])
    assert pseudo_pairs(passages, ("ict",), seed=3) == pseudo_pairs(passages, ("ict",), seed=3)


def test_sampler_per_epoch_draws_a_fresh_subset_each_epoch():
    s = Sampler([Example(f"q{i}", ["p"]) for i in range(50)], 4, seed=0, per_epoch=10)
    firsts = [sorted(i for b in s.epoch_batches(e) for i in b) for e in range(3)]
    assert all(len(f) == 10 == len(set(f)) for f in firsts) and firsts[0] != firsts[1]


def test_unlabeled_task_trains_alongside_and_is_never_reported(beir, tiny_model_dir, tmp_path):
    cfg, _ = parse_args(["--data", str(beir), "--unlabeled", "both", "--unlabeled-ratio", "0.5",
                         "--out-dir", str(tmp_path)])
    tasks, split = load_tasks(cfg, tmp_path / "split", write=False)
    u = tasks["unlabeled"]
    assert list(labelled(tasks)) == ["retrieval"] and u.val is None and u.test_data is None
    assert len(u.train) == 36 * 2 and u.per_epoch == round(0.5 * len(tasks["retrieval"].train))
    test_queries = {tasks["retrieval"].test_data.queries[q] for q in tasks["retrieval"].test_data.queries}
    assert not test_queries & {ex.query for ex in u.train}  # passages, never a held-out query
    train.main(args(beir, tiny_model_dir, tmp_path, "--run-name", "u", "--epochs", "2", "--unlabeled", "both",
                    "--unlabeled-ratio", "0.5"))
    lines = [json.loads(l) for l in (tmp_path / "u" / "metrics.jsonl").read_text().splitlines()]
    assert {l["task"] for l in lines if "task" in l} == {"retrieval", "unlabeled"}
    assert any("val/ndcg@10" in l for l in lines)  # validation keeps its plain names
    results = json.loads((tmp_path / "u" / "results.json").read_text())
    assert "fine_tuned" in results and "tasks" not in results and results["train_unlabeled"] == 72
    with pytest.raises(UserError, match="no retrieval lines"):
        sts = tmp_path / "sts.jsonl"
        sts.write_text("".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i % 5}) + "\n"
                               for i in range(20)))
        load_tasks(parse_args(["--data", str(sts), "--unlabeled", "ict", "--out-dir", str(tmp_path)])[0], tmp_path / "s", write=False)


def test_unlabeled_stage_trains_the_pseudo_pairs_first_then_the_labelled_data_and_resumes_mid_stage(
        beir, tiny_model_dir, tmp_path, monkeypatch):
    import bge.checkpoint
    import bge.training
    from bge.embedder import Embedder

    used = []  # the queries of each micro-step, in order
    real_fb = bge.training.forward_backward
    monkeypatch.setattr(bge.training, "forward_backward", lambda embed, inputs, *a, **k: used.append(
        {tuple(ids) for ids in inputs["q"]}) or real_fb(embed, inputs, *a, **k))
    common = args(beir, tiny_model_dir, tmp_path, "--epochs", "2", "--unlabeled", "both", "--unlabeled-ratio", "1.5",
                  "--unlabeled-stage", "--mine-negatives", "0", "--save-every", "1")
    monkeypatch.setattr(bge.checkpoint, "KEEP", 1000)  # every step's state, to cut the run anywhere
    train.main([*common, "--run-name", "whole"])
    run = tmp_path / "whole"
    cfg, _ = parse_args(common)
    tasks, _ = load_tasks(cfg, tmp_path / "split", write=False)
    retrieval, unlabeled = tasks["retrieval"], tasks["unlabeled"]
    assert unlabeled.stage and unlabeled.per_epoch == round(1.5 * len(retrieval.train))
    stage = math.ceil(unlabeled.per_epoch / 4)  # the stage's steps: one pass of per_epoch pairs, batches of 4
    per_epoch = len(TaskSampler({"retrieval": retrieval}, 4, seed=0))
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [l["task"] for l in sorted((l for l in lines if "task" in l), key=lambda l: l["step"])]
    assert trained == ["unlabeled"] * stage + ["retrieval"] * 2 * per_epoch  # every pseudo-pair batch comes first
    assert len(used) == stage + 2 * per_epoch
    tokenizer = Embedder.load(str(tiny_model_dir)).tokenizer
    pseudo = {tuple(ids) for ids in tokenizer.tokenize([ex.query for ex in unlabeled.train], max_length=16)}
    assert all(q <= pseudo for q in used[:stage]) and not any(q & pseudo for q in used[stage:])
    validated = sorted(l["step"] for l in lines if "val/ndcg@10" in l)
    # every epoch's worth of steps counted back from the stage's end: the labelled epochs' ends, the stage's own end
    assert validated == [0] + list(range(stage % per_epoch or per_epoch, stage + 2 * per_epoch + 1, per_epoch))
    assert {stage, stage + per_epoch, stage + 2 * per_epoch} <= set(validated)
    lrs = {l["step"]: l["lr"] for l in lines if "lr" in l}
    assert lrs[stage + 1] < lrs[stage]  # one schedule over both: it decays on into the labelled steps

    # killed in the middle of the stage: the resume finishes it and the labelled epochs, to the same weights
    shutil.copytree(run, tmp_path / "cut")
    state = tmp_path / "cut" / "state"
    for d in state.glob("step-*"):
        if int(d.name.split("-")[1]) != stage - 1:
            shutil.rmtree(d)
    (state / "latest.json").write_text(json.dumps({"dir": f"step-{stage - 1:08d}", "step": stage - 1}))
    (tmp_path / "cut" / "results.json").unlink()
    train.main(["--resume", str(tmp_path / "cut")])
    a = load_file(str(run / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_unlabeled_stage_needs_pseudo_pairs_and_is_the_only_stage(beir, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--unlabeled-stage trains on"):
        train.main(args(beir, tiny_model_dir, tmp_path, "--max-steps", "1", "--unlabeled-stage"))
    with pytest.raises(UserError, match="both a first stage"):
        train.main(args(beir, tiny_model_dir, tmp_path, "--max-steps", "1", "--unlabeled", "ict", "--unlabeled-stage",
                        "--distill-from", str(tiny_model_dir), "--distill-corpus", "data"))
    assert not any(tmp_path.glob("*/results.json"))


# ---- hard negatives mined inside train.py -------------------------------------------------------------------
def test_mined_negatives_are_never_positives_cached_and_share_the_base_encoding(beir, tiny_model_dir, tmp_path,
                                                                                 monkeypatch, capsys):
    import bge.tasks

    calls = []
    real = bge.tasks.mine
    monkeypatch.setattr(bge.tasks, "mine", lambda *a, **k: calls.append(k["retriever"]) or real(*a, **k))
    common = args(beir, tiny_model_dir, tmp_path, "--epochs", "1", "--mine-negatives", "3", "--mine-range", "0-20",
                  "--mine-margin", "0.0", "--group-size", "3")
    train.main([*common, "--run-name", "a"])
    assert calls == ["model"]
    cached = list((tmp_path / "cache").glob("mined-*.json"))
    assert len(cached) == 1
    negatives = json.loads(cached[0].read_text())["negatives"]
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    corpus = {json.loads(l)["_id"]: json.loads(l) for l in (beir / "corpus.jsonl").read_text().splitlines()}
    train_ids = split["tasks"]["retrieval"]["train"]
    assert len(negatives) == len(train_ids) and all(len(n) == 3 for n in negatives)
    for qid, negs in zip(train_ids, negatives):  # the training queries, in order
        own = corpus["d" + qid.lstrip("q")]
        assert normalise(f"{own['title']} {own['text']}") not in {normalise(n) for n in negs}
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["test_passages_encoded"] == 0
    # a second run with the same base model and data mines nothing: the cache answers
    train.main([*common, "--run-name", "b"])
    assert calls == ["model"]
    # a query instruction changes how the base encodes the queries, so it mines afresh and keeps its own entry;
    # so does a BM25 ranking of the candidates
    train.main([*common, "--run-name", "prompted", "--query-prompt", "query: "])
    assert calls == ["model", "model"] and len(list((tmp_path / "cache").glob("mined-*.json"))) == 2
    capsys.readouterr()
    train.main([*common, "--run-name", "lexical", "--mine-with", "bm25"])
    assert calls == ["model", "model", "bm25"] and len(list((tmp_path / "cache").glob("mined-*.json"))) == 3
    assert "ranked by BM25, filtered by the base model" in " ".join(capsys.readouterr().err.split())
    # a passage instruction changes how the base encodes the corpus
    train.main([*common, "--run-name", "passages", "--passage-prompt", "passage: "])
    assert calls == ["model", "model", "bm25", "model"] and len(list((tmp_path / "cache").glob("mined-*.json"))) == 4
    with pytest.raises(UserError, match="--mine-range"):
        train.main([*common, "--run-name", "c", "--mine-range", "20-10"])


def test_by_default_a_transformer_mines_7_negatives_a_new_bilstm_none_and_0_opts_out(beir, tiny_model_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    import bge.tasks
    from bge.config import mined_negatives

    assert [mined_negatives(parse_args(["--data", "x", *extra])[0]) for extra in
            ([], ["--arch", "bilstm"], ["--mine-negatives", "0"], ["--arch", "bilstm", "--mine-negatives", "2"])] == [7, 0, 0, 2]
    counts = []
    real = bge.tasks.mine
    monkeypatch.setattr(bge.tasks, "mine", lambda *a, **k: counts.append(k["negatives"]) or real(*a, **k))
    common = args(beir, tiny_model_dir, tmp_path, "--max-steps", "1", "--mine-range", "0-20", "--mine-margin", "0.0")
    train.main([*common, "--run-name", "default"])  # no flag: the data has no negatives, so they are mined
    assert counts == [7] and "--mine-negatives 0 trains without them" in " ".join(capsys.readouterr().err.split())
    train.main([*common, "--run-name", "off", "--mine-negatives", "0"])
    assert counts == [7] and "in-batch negatives only" in " ".join(capsys.readouterr().err.split())


def test_a_file_with_negatives_on_some_lines_is_not_mined_and_says_which_train_without(tiny_model_dir, tmp_path,
                                                                                       capsys):
    data = tmp_path / "some.jsonl"
    data.write_text("".join(json.dumps({"query": f"how do I check the {t} ({i})", "pos": [f"Look at the {t} {i}."]}
                                       | ({"neg": [f"Paint the frame {i}."]} if i % 3 == 0 else {})) + "\n"
                            for i, t in enumerate(TOPICS * 2)))
    train.main(args(data, tiny_model_dir, tmp_path, "--max-steps", "1", "--run-name", "some"))
    err = " ".join(capsys.readouterr().err.split())
    split = json.loads((tmp_path / "some" / "split.json").read_text())["tasks"]["retrieval"]["train"]
    bare = sum(int(q) % 3 != 1 for q in split)  # qids are line numbers from 1: line i + 1 has negatives when 3 | i
    assert f"{bare} of {len(split)} training queries have no hard negatives" in err
    assert "hard negatives for" not in err  # nothing mined: the file brings negatives
    data.write_text("".join(json.dumps({"query": f"how do I check the {t}", "pos": [f"Look at the {t}."],
                                        "neg": ["Paint the frame."]}) + "\n" for t in TOPICS))
    train.main(args(data, tiny_model_dir, tmp_path, "--max-steps", "1", "--run-name", "all"))
    assert "no hard negatives" not in capsys.readouterr().err


def test_remine_mines_again_with_the_trained_model_trains_on_it_and_resumes_with_it(beir, tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    import bge.tasks
    import bge.training
    from bge.embedder import Embedder

    mined, used = [], []  # (model fingerprint, negative ids per training query); the passages of each micro-step
    real_mine, real_fb = bge.tasks.mine, bge.training.forward_backward

    def spy_mine(model, data, examples, **kw):
        lines, report = real_mine(model, data, examples, **kw)
        mined.append((model.fingerprint(), [line["mined"]["ids"] for line in lines], data, examples))
        return lines, report

    monkeypatch.setattr(bge.tasks, "mine", spy_mine)
    monkeypatch.setattr(bge.training, "forward_backward", lambda embed, inputs, *a, **k: used.append(
        {tuple(ids) for ids in inputs["p"]}) or real_fb(embed, inputs, *a, **k))
    common = args(beir, tiny_model_dir, tmp_path, "--epochs", "3", "--mine-negatives", "3", "--mine-range", "0-20",
                  "--mine-margin", "0.0", "--group-size", "3", "--remine", "--cache-dir", str(tmp_path / "c"))
    train.main([*common, "--run-name", "whole"])
    run = tmp_path / "whole"
    # the base model before training, then the trained model at the end of epochs 1 and 2 (not after the last)
    assert len(mined) == 3 and len({fp for fp, *_ in mined}) == 3
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "state").glob("step-*"))  # epochs 2 and 3 kept
    per_epoch = steps[1] - steps[0]
    trainer = json.loads((run / "state" / f"step-{steps[0]:08d}" / "trainer.json").read_text())
    assert trainer["negatives"] == mined[2][1]  # the state holds the negatives epoch 3 trains on
    # every passage of epoch k's micro-batches is a positive or one of the negatives mined before epoch k
    data, examples = mined[0][2], mined[0][3]
    tokenizer = Embedder.load(str(tiny_model_dir)).tokenizer
    positives = {t for ex in examples for t in ex.pos}
    allowed = [{tuple(ids) for ids in tokenizer.tokenize(sorted(positives | {data.corpus[d] for row in rows for d in row}),
                                                         max_length=48)} for _, rows, *_ in mined]
    assert len(used) == 3 * per_epoch
    for epoch in range(3):
        seen = set().union(*used[epoch * per_epoch:(epoch + 1) * per_epoch])
        assert seen <= allowed[epoch], f"epoch {epoch + 1} trained on negatives that were not its own"
    assert any(not (allowed[e] <= allowed[e - 1]) for e in (1, 2))  # the refresh changed some negatives

    # killed after epoch 2's state: the resume trains epoch 3 on the negatives that state holds, to the same weights
    shutil.copytree(run, tmp_path / "cut")
    state = tmp_path / "cut" / "state"
    shutil.rmtree(state / f"step-{steps[1]:08d}")
    (state / "latest.json").write_text(json.dumps({"dir": f"step-{steps[0]:08d}", "step": steps[0]}))
    (tmp_path / "cut" / "results.json").unlink()
    train.main(["--resume", str(tmp_path / "cut")])
    assert len(mined) == 3  # nothing mined: the base model's negatives come from the cache, none after the last epoch
    a = load_file(str(run / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_remine_needs_negatives_the_run_mines(beir, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--remine mines again"):
        train.main(args(beir, tiny_model_dir, tmp_path, "--max-steps", "1", "--remine", "--mine-negatives", "0"))
    assert not any(tmp_path.glob("*/results.json"))


# ---- the split stays put while the training seed moves ---------------------------------------------------------
def test_split_seed_fixes_the_test_set_across_seeds(beir, tmp_path):
    def test_ids(*extra):
        cfg, _ = parse_args(["--data", str(beir), "--out-dir", str(tmp_path), *extra])
        return load_tasks(cfg, tmp_path / "_".join(extra), write=False)[1]["tasks"]["retrieval"]["test"]

    assert test_ids("--seed", "1", "--split-seed", "7") == test_ids("--seed", "2", "--split-seed", "7")
    assert test_ids("--seed", "1") != test_ids("--seed", "2")  # without it, --seed draws the split as before
    # and the test set does not depend on the validation share (groups are dealt to test first)
    assert test_ids("--split-seed", "7", "--val-ratio", "0") == test_ids("--split-seed", "7")


# ---- --extra-data: trained on, never held out -------------------------------------------------------------------
DISHES = ["risotto", "sourdough", "ramen broth", "pie crust", "custard", "curry paste", "pickles", "gnocchi"]


def write_kitchen(folder: Path) -> Path:
    """Another domain's BEIR folder: 16 recipe passages, 8 queries with one relevant passage each."""
    (folder / "qrels").mkdir(parents=True)
    docs = [{"_id": f"k{i}", "title": f"Kitchen notes {i}",
             "text": f"Stir the {DISHES[i % 8]} for {i + 3} minutes. Salt the {DISHES[i % 8]} late. Rest it {i} hours."}
            for i in range(16)]
    queries = [{"_id": f"c{i}", "text": f"how long do I cook the {DISHES[i]}"} for i in range(8)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"c{i}\tk{i}\t1\n" for i in range(8)))
    return folder


def test_extra_data_is_trained_on_and_leaves_the_split_and_the_held_out_sets_as_they_were(beir, tmp_path):
    kitchen = write_kitchen(tmp_path / "kitchen")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"what goes with {d}", "pos": [f"Serve {d} with bread."]}) + "\n"
                             for d in DISHES[:5]))

    def load(*extra):
        cfg, _ = parse_args(["--data", str(beir), "--split-seed", "7", "--unlabeled", "both", *extra])
        return load_tasks(cfg, tmp_path / str(len(extra)), write=False)

    (alone, split), (mixed, split_mixed) = load(), load("--extra-data", str(kitchen), str(pairs))
    assert split_mixed == split  # --data's ids are not prefixed, so its carve is the same, id for id
    a, b = alone["retrieval"], mixed["retrieval"]
    for x, y in ((a.val, b.val), (a.test_data, b.test_data), (a.full, b.full)):
        assert x.fingerprint() == y.fingerprint()
    n = len(a.train)
    assert [(ex.qid, ex.query, ex.pos) for ex in b.train[:n]] == [(ex.qid, ex.query, ex.pos) for ex in a.train]
    extra = b.train[n:]  # every line of both, none held out, each under its source's prefix
    assert Counter(ex.file for ex in extra) == {1: 8, 2: 5}
    assert all(ex.qid.startswith(f"{ex.file}:") for ex in extra)
    assert set(b.anchor_files()) == {0, 1, 2}  # the sampler draws micro-batches of each
    assert b.extra_sets[1].corpus.keys() == {f"1:k{i}" for i in range(16)} and len(b.extra_sets[2].queries) == 5
    # the pseudo-pairs come from the domain's passages, not from another domain's
    assert len(mixed["unlabeled"].train) == len(alone["unlabeled"].train)


def test_extra_data_refuses_what_nothing_would_validate_and_names_the_flag(beir, tmp_path):
    sts = tmp_path / "sts.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": i % 5}) + "\n"
                           for i in range(6)))
    for extra, message in (([str(sts)], "--extra-data .*sts.jsonl has sts items and --data has none"),
                           ([str(tmp_path / "nowhere")], "--extra-data .*nowhere: no such file or folder"),
                           ([str(beir)], "--extra-data: .*bikes is given twice")):
        cfg, _ = parse_args(["--data", str(beir), "--extra-data", *extra])
        with pytest.raises(UserError, match=message):
            load_tasks(cfg, tmp_path / "run", write=False)
    # --corpus belongs to a JSONL --data; an extra BEIR folder beside it brings its own and is no conflict
    lines = tmp_path / "bikes.jsonl"
    lines.write_text("".join(json.dumps({"query": f"how do I service the {t}", "pos": [f"Clean the {t} first."]}) + "\n"
                             for t in TOPICS))
    cfg, _ = parse_args(["--data", str(lines), "--corpus", str(beir), "--extra-data", str(write_kitchen(tmp_path / "k"))])
    tasks, _ = load_tasks(cfg, tmp_path / "run", write=False)
    assert len(tasks["retrieval"].full.corpus) == 36 + 12 and set(tasks["retrieval"].extra_sets) == {1}


def test_extra_data_is_mined_against_its_own_passages_and_leaves_the_data_negatives_alone(beir, tiny_model_dir,
                                                                                          tmp_path, monkeypatch):
    import bge.tasks

    kitchen = write_kitchen(tmp_path / "kitchen")
    calls = []
    real = bge.tasks.mine
    monkeypatch.setattr(bge.tasks, "mine", lambda model, data, examples, **k: calls.append(
        (set(data.corpus.values()), examples)) or real(model, data, examples, **k))
    common = args(beir, tiny_model_dir, tmp_path, "--epochs", "1", "--mine-negatives", "3", "--mine-range", "0-20",
                  "--mine-margin", "0.0", "--group-size", "3", "--split-seed", "7")
    train.main([*common, "--run-name", "alone"])
    train.main([*common, "--run-name", "mixed", "--extra-data", str(kitchen), "--remine"])
    (bikes, alone), (bikes_again, data_rows), (dishes, kitchen_rows), *remined = calls
    assert bikes_again == bikes and not dishes & bikes and len(remined) == 0  # one epoch: nothing re-mined
    assert [ex.neg for ex in data_rows] == [ex.neg for ex in alone]  # --data's queries mined as without the extra
    assert {ex.file for ex in kitchen_rows} == {1} and all(ex.neg and set(ex.neg) <= dishes for ex in kitchen_rows)
    results = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("alone", "mixed")]
    assert results[0]["base"] == results[1]["base"]  # the same test set, so the same base row
    assert results[1]["config"]["extra_data"] == [str(kitchen)]
    assert "- extra training data, never held out: `kitchen`" in (tmp_path / "mixed" / "best" / "README.md").read_text()


# ---- the quality benchmark ------------------------------------------------------------------------------------
def test_quality_benchmark_trains_both_sides_on_one_split_and_resumes(beir, tiny_model_dir, tmp_path):
    out = tmp_path / "q"
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--data", str(beir), "--model", str(tiny_model_dir),
           "--seeds", "1,2", "--out", str(out), "--max-length", "48", "--precision", "fp32",
           "--bge", "tiny=--epochs 1 --batch-size 4 --lr 1e-3 --max-passage-length 48 --explain 0",
           "--st", "tiny=--batch-size 4 --lr 1e-3"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    q = json.loads((out / "quality.json").read_text())
    assert set(q["recipes"]) == {"base", "bge tiny", "st tiny"}
    for name in ("bge tiny", "st tiny"):
        row = q["recipes"][name]
        assert len(row["ndcg@10"]["per_seed"]) == 2 and row["train_seconds"] > 0
    st_pairs = q["recipes"]["st tiny"]["runs"]["1"]["pairs"]
    assert st_pairs == 24 - q["test_queries"]  # every non-test query's pair, one positive each
    # each seed keeps every test query's nDCG@10, whose mean is the seed's; the paired differences are of the
    # seed-averaged per-query scores, so their means are the differences of the rows' means
    bge, st, base = (q["recipes"][n] for n in ("bge tiny", "st tiny", "base"))
    for run, nd in zip(bge["runs"].values(), bge["ndcg@10"]["per_seed"]):
        assert len(run["per_query"]) == q["test_queries"]
        assert abs(sum(run["per_query"].values()) / q["test_queries"] - nd) < 1e-9
    assert abs(bge["vs base"]["mean"] - (bge["ndcg@10"]["mean"] - base["ndcg@10"]["mean"])) < 1e-9
    assert abs(bge["vs st tiny"]["mean"] - (bge["ndcg@10"]["mean"] - st["ndcg@10"]["mean"])) < 1e-9
    assert bge["vs base"]["low"] <= bge["vs base"]["mean"] <= bge["vs base"]["high"]
    assert "vs st tiny" not in st and "vs base" in st and "vs base" not in base
    # a second call trains nothing: each (recipe, seed) was saved when it ended; a score.json from before the
    # per-query scores were kept gets them back from its saved model, the same values
    logs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/log.txt")}
    assert len(logs) == 4
    old = out / "runs" / "bge-tiny" / "seed2" / "score.json"
    info = json.loads(old.read_text())
    kept = info.pop("per_query")
    old.write_text(json.dumps(info))
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/log.txt")} == logs
    assert json.loads((out / "quality.json").read_text())["recipes"]["st tiny"]["ndcg@10"] == q["recipes"]["st tiny"]["ndcg@10"]
    assert json.loads(old.read_text())["per_query"] == pytest.approx(kept, abs=1e-9)
    assert json.loads((out / "quality.json").read_text())["recipes"]["bge tiny"]["vs base"] == bge["vs base"]
    # --vs names the recipe the others are paired with (one-knob rows against bge's default): here the peer turned
    # round, so sentence-transformers' row gets bge's difference negated, seed by seed too
    vs = subprocess.run(cmd + ["--vs", "bge tiny"], cwd=REPO, capture_output=True, text=True)
    assert vs.returncode == 0, vs.stderr[-3000:]
    q3 = json.loads((out / "quality.json").read_text())["recipes"]
    d = q3["st tiny"]["vs bge tiny"]
    assert d["seeds"] == [1, 2] and d["mean"] == pytest.approx(-bge["vs st tiny"]["mean"], abs=1e-9)
    for k, (x, y) in enumerate(zip(st["ndcg@10"]["per_seed"], bge["ndcg@10"]["per_seed"]), start=1):
        assert d["per_seed"][str(k)]["mean"] == pytest.approx(x - y, abs=1e-9)
    assert "vs bge tiny" not in q3["bge tiny"] and "vs st tiny" not in q3["bge tiny"]
    # --no-train reports what is saved and trains nothing: seed 3 has no score, so it is left out, not run
    three = [x if x != "1,2" else "1,2,3" for x in cmd]
    report = subprocess.run(three + ["--vs", "bge tiny", "--no-train"], cwd=REPO, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "bge tiny seed 3: no score saved; left out (--no-train)" in " ".join((report.stdout + report.stderr).split())
    assert not list(out.glob("runs/*/seed3/*")) and {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/log.txt")} == logs
    assert json.loads((out / "quality.json").read_text())["recipes"] == q3
    for name, why in (("tiny", "names two recipes"), ("bge nope", "not a recipe of this command")):
        bad = subprocess.run(cmd + ["--vs", name], cwd=REPO, capture_output=True, text=True)
        text = " ".join((bad.stdout + bad.stderr).split())
        assert bad.returncode == 2 and f"--vs '{name}': {why} (its recipes: bge tiny, st tiny)" in text, text
        assert "Traceback" not in text


def test_quality_benchmark_pairs_a_recipe_with_another_on_the_seeds_both_ran():
    """--vs compares a knob with the run it changed: seed k against seed k only, a seed without every query's score
    left out; the pooled interval is over the per-query scores averaged over the common seeds."""
    from benchmarks.quality import paired_difference, versus
    qids = ["a", "b", "c", "d"]
    run = lambda *xs: {"per_query": dict(zip(qids, xs))}
    knob = {"seeds": {1: run(.5, .6, .7, .2), 2: run(.9, .1, .4, .4), 3: {"per_query": {"a": .3}}}}
    default = {"seeds": {1: run(.4, .6, .5, .2), 2: run(.8, .3, .4, .3), 3: run(.1, .1, .1, .1), 4: run(1, 1, 1, 1)}}
    d = versus(knob, default, qids)
    assert d["seeds"] == [1, 2]  # seed 4 is the default's alone, seed 3 of the knob lacks queries
    assert d["per_seed"][1]["mean"] == pytest.approx(0.3 / 4) and d["per_seed"][2]["mean"] == pytest.approx(0.0)
    mean = lambda x: [(x["seeds"][1]["per_query"][q] + x["seeds"][2]["per_query"][q]) / 2 for q in qids]
    ref = paired_difference(mean(knob), mean(default))
    assert {k: d[k] for k in ref} == pytest.approx(ref) and d["mean"] == pytest.approx(0.3 / 8)
    assert versus({"seeds": {5: run(.1, .2, .3, .4)}}, default, qids) is None  # no seed in common


def test_quality_benchmark_paired_interval_matches_scipy_bootstrap():
    """The paired interval is a percentile bootstrap of the mean difference: scipy's, up to resampling noise."""
    from scipy.stats import bootstrap
    from benchmarks.quality import paired_difference
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0, 1, 121), rng.uniform(0, 1, 121) - 0.05
    d = paired_difference(list(a), list(b))
    ref = bootstrap(((a - b),), np.mean, method="percentile", n_resamples=10_000, random_state=1).confidence_interval
    width = ref.high - ref.low
    assert d["mean"] == pytest.approx(float((a - b).mean()), abs=1e-12)
    assert abs(d["low"] - ref.low) < 0.05 * width and abs(d["high"] - ref.high) < 0.05 * width
    assert d["share_better"] == pytest.approx(float((a > b).mean()))
    same = paired_difference([0.5, 0.7, 0.2], [0.4, 0.6, 0.1])  # every query 0.1 better: no spread to resample
    assert same["low"] == pytest.approx(0.1) and same["high"] == pytest.approx(0.1) and same["share_better"] == 1


def test_quality_benchmark_leaves_a_seed_another_process_is_running_alone(beir, tiny_model_dir, tmp_path):
    """Two quality.py processes on one --out (the same command twice, for two lanes) must not clear each other's
    run: a (recipe, seed) whose lock is held elsewhere is skipped, its folder untouched; the free seed is trained."""
    out = tmp_path / "q"
    busy = out / "runs" / "bge-tiny" / "seed1"
    busy.mkdir(parents=True)
    (busy / "log.txt").write_text("the other process's run\n")
    fd = os.open(busy.parent / "seed1.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held here, as the other process would
    try:
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--data", str(beir), "--model",
                            str(tiny_model_dir), "--seeds", "1,2", "--out", str(out), "--max-length", "48",
                            "--precision", "fp32", "--bge", "tiny=--epochs 1 --batch-size 4 --lr 1e-3 "
                            "--max-passage-length 48 --explain 0"], cwd=REPO, capture_output=True, text=True)
    finally:
        os.close(fd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bge tiny seed 1: another quality.py is running it" in " ".join((r.stdout + r.stderr).split())
    assert (busy / "log.txt").read_text() == "the other process's run\n" and not (busy / "score.json").exists()
    assert (out / "runs" / "bge-tiny" / "seed2" / "score.json").exists()
    assert list(json.loads((out / "quality.json").read_text())["recipes"]["bge tiny"]["runs"]) == ["2"]
