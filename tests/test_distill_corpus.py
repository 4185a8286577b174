"""The --distill-corpus stage: pieces cut from passages, the teacher's on-disk cache (keyed so another teacher, length
or precision never reads it), the sampler drawing the stage first, the stage lowering the distillation loss on
held-out passages, and a run killed mid-stage resuming to the same weights."""
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from bge import Embedder, load
from bge.config import TrainConfig
from bge.data import Example
from bge.distill import Teacher, read_store, text_key
from bge.errors import UserError
from bge.evaluation import CorpusCache, encode_corpus
from bge.tasks import CorpusTask, RetrievalTask, TaskSampler, corpus_task
from bge.unlabeled import MIN_WORDS, SPAN_WORDS, piece, sentences
from conftest import long_passages_beir, make_tiny_model, start_and_kill
from test_train import args as train_args, data  # noqa: F401 (data: the fixture, 60 lines of the example file)

REPO = Path(__file__).resolve().parents[1]
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


pytestmark = pytest.mark.usefixtures("one_thread")


def args(data, model, out, *extra):
    """test_train's tiny run, as a BiLSTM student of the tiny model with a --distill-corpus stage."""
    return train_args(data, model, out, "--arch", "bilstm", "--lstm-hidden", "8", "--distill-from", str(model),
                      "--distill-corpus", "data", "--distill-corpus-val", "16", "--threads", "1", *extra)


def test_piece_is_a_usable_sentence_or_a_span_of_the_body():
    body = ("The chain wears with every ride. Check it with a gauge often! A worn chain wears the cassette too. "
            "Replace it early.")
    usable = [s for s in sentences(body) if len(s.split()) >= MIN_WORDS]
    words = body.split()
    kinds = set()
    for seed in range(200):
        p = piece(body, usable, random.Random(seed))
        assert p == piece(body, usable, random.Random(seed))  # a pure function of the draw
        n = len(p.split())
        is_span = any(words[i : i + n] == p.split() for i in range(len(words) - n + 1))
        assert p in usable or (is_span and MIN_WORDS <= n <= SPAN_WORDS), p
        kinds.add("sentence" if p in usable else "span")
        kinds.add(f"length {n}")
    assert {"sentence", "span"} <= kinds and len(kinds) > 8  # both kinds, many lengths
    assert piece("two words", [], random.Random(0)) == "two words"  # a short body is its own span


def test_teacher_store_is_read_back_and_keyed_by_teacher_length_and_precision(tmp_path, minilm_dir, monkeypatch):
    a = load(str(make_tiny_model(tmp_path / "a", minilm_dir, seed=1)), device="cpu")
    b = load(str(make_tiny_model(tmp_path / "b", minilm_dir, seed=2)), device="cpu")  # same config, other weights
    texts = ["a chain wears", "the brake squeals when wet", "a chain wears"]
    store = tmp_path / "cache"
    first = Teacher(a, max_query_length=16, max_passage_length=32, store=store)
    rows = first.lookup("p", texts)
    assert torch.equal(rows[0], rows[2])
    first.flush()
    first.flush()  # nothing new: no second shard
    (folder,) = store.iterdir()
    assert len(list(folder.glob("*.safetensors"))) == 1
    assert json.loads((folder / "teacher.json").read_text())["fingerprint"] == a.fingerprint()
    assert set(read_store(folder)) == {text_key("p", t) for t in texts}

    calls = []
    real = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, t, **kw: calls.append(list(t)) or real(self, t, **kw))
    again = Teacher(load(str(tmp_path / "a"), device="cpu"), max_query_length=16, max_passage_length=32, store=store)
    assert torch.equal(again.lookup("p", texts), rows) and calls == []  # the same teacher reads, encodes nothing
    assert again.lookup("q", texts[:1]) is not None and calls == [texts[:1]]  # a query is another text

    other = Teacher(b, max_query_length=16, max_passage_length=32, store=store)
    calls.clear()
    theirs = other.lookup("p", texts)
    assert calls == [texts[:2]]  # a different teacher never reuses a's rows
    assert torch.allclose(theirs, b.encode(texts, max_length=32, as_numpy=False), atol=1e-6)
    assert not torch.allclose(theirs, rows, atol=1e-3)
    longer = Teacher(a, max_query_length=16, max_passage_length=48, store=store)
    bf16 = Teacher(a, max_query_length=16, max_passage_length=32, cpu_bf16=True, store=store)
    assert len({t.folder for t in (first, other, longer, bf16)}) == 4 and longer.cache == {} and bf16.cache == {}


def test_preload_takes_the_corpus_from_the_evaluation_cache(tmp_path, tiny_model_dir, monkeypatch):
    model = load(str(tiny_model_dir), device="cpu")
    corpus = {f"d{i}": f"passage number {i} says something about chains" for i in range(5)}
    kept = encode_corpus(model, corpus, max_length=32, cache_dir=tmp_path / "c").emb  # as the teacher's own test did
    calls = []
    real = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, t, **kw: calls.append(list(t)) or real(self, t, **kw))
    teacher = Teacher(model, max_query_length=16, max_passage_length=32, store=tmp_path / "c")
    assert teacher.preload(corpus, CorpusCache(tmp_path / "c")) == 5 and calls == []
    assert torch.equal(teacher.lookup("p", list(corpus.values())), kept) and calls == []
    other = Teacher(model, max_query_length=16, max_passage_length=24, store=tmp_path / "c")
    assert other.preload(corpus, CorpusCache(tmp_path / "c")) == 0 and len(calls) == 1  # another length: encoded


def test_the_teacher_embeds_passages_with_its_passage_instruction_and_preloads_them_so(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    from bge.batching import make_batch

    model = load(str(tiny_model_dir), device="cpu", passage_prompt="passage: ")
    corpus = {f"d{i}": f"passage number {i} says something about chains" for i in range(5)}
    teacher = Teacher(model, max_query_length=16, max_passage_length=32)
    teacher.preload(corpus, CorpusCache(None))
    calls = []
    real = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, t, **kw: calls.append(list(t)) or real(self, t, **kw))
    batch = make_batch([Example(f"q{i}", [t]) for i, t in enumerate(corpus.values())], list(range(5)), group_size=1,
                       seed=0, epoch=0)
    got = teacher.embed(batch, torch.device("cpu"))["p"]
    assert calls == [batch.query_texts(model.tokenizer.query_prompt)]  # every passage was preloaded, prefixed
    expected = real(model, ["passage: " + t for t in batch.passages], max_length=32, as_numpy=False)
    assert torch.allclose(got, expected, atol=1e-6)


def test_the_stage_gives_its_passages_the_passage_instruction(tmp_path, minilm_dir):
    # the student's passages take its passage instruction, the teacher's take the teacher's own: a student that is
    # the teacher embeds every held-out text exactly as the teacher does (mean pooling: a random model's CLS
    # embedding barely tells a prefixed text from a bare one)
    folder = make_tiny_model(tmp_path / "model", minilm_dir, pooling="mean")
    model = load(str(folder), device="cpu", passage_prompt="Doc: ")
    cfg = TrainConfig(seed=1, batch_size=4)
    queries = [Example(f"query {i}", [f"passage {i} is about chains"]) for i in range(4)]
    stage = CorpusTask([], queries, [], cfg)
    stage.val = queries
    stage.teacher = Teacher(model, max_query_length=cfg.max_query_length, max_passage_length=cfg.max_passage_length)
    inputs, _ = stage.micro_batch(list(range(4)), 0, model.tokenizer, torch.device("cpu"))
    decoded = {k: [model.tokenizer.tk.decode(ids, skip_special_tokens=True) for ids in v] for k, v in inputs.items()}
    assert all(p.startswith("doc : passage") for p in decoded["p"]) and all(q.startswith("query") for q in decoded["q"])
    assert stage.validate(model, False)["cosine"] > 1 - 1e-5


def test_the_stage_comes_first_then_the_labelled_epochs_as_without_it(tmp_path):
    cfg = TrainConfig(seed=3)
    queries = [Example(f"query {i}", [f"passage {i}"]) for i in range(10)]
    retrieval = RetrievalTask(queries, None, None, cfg)
    stage = CorpusTask([], queries, [], cfg)  # ten items: the queries
    plain = TaskSampler({"retrieval": retrieval}, 4, seed=3)
    staged = TaskSampler({"corpus": stage, "retrieval": retrieval}, 4, seed=3, stage_steps=5, grad_accum=2)
    assert staged.stage_steps == 5 and len(staged) == len(plain) == 3
    drawn = [staged.batch(m) for m in range(10 + 6)]
    assert [name for _, name, _ in drawn] == ["corpus"] * 10 + ["retrieval"] * 6
    assert [e for e, _, _ in drawn[:10]] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]  # the stage's own epochs over 10 items
    assert drawn[10:] == [plain.batch(m) for m in range(6)]
    one_pass = TaskSampler({"corpus": stage, "retrieval": retrieval}, 4, seed=3, grad_accum=2)
    assert one_pass.stage_steps == 2  # 0: one pass of 3 batches, rounded up to whole optimiser steps


def test_corpus_task_sources_held_out_passages_and_errors(data, tmp_path):
    cfg = TrainConfig(data=str(data), distill_from="teacher", distill_corpus="data", distill_corpus_val=5, seed=1)
    queries = [Example("how tight is a stem bolt", ["Stem bolts are tightened to 5 Nm in steps, crosswise."])]
    retrieval = RetrievalTask(queries, None, None, cfg)
    corpus = tmp_path / "passages.jsonl"
    lines = [{"title": f"T{i}", "text": f"Passage number {i} says a few words. And a second sentence here."}
             for i in range(58)] + [{"text": "too short"}, {"text": queries[0].pos[0]}]
    corpus.write_text("".join(json.dumps(l) + "\n" for l in lines))
    task = corpus_task(TrainConfig(**{**cfg.to_dict(), "distill_corpus": str(corpus)}), {"retrieval": retrieval}, data)
    assert task.n_passages == 59 - 5 and task.n_queries == 1 and len(task.val) == 5
    ten = corpus_task(TrainConfig(**{**cfg.to_dict(), "distill_corpus": str(corpus), "distill_corpus_val": 99}),
                      {"retrieval": retrieval}, data)
    assert len(ten.val) == 5 and ten.n_passages == 54  # at most a tenth of the 59 passages held out
    held = {ex.pos[0] for ex in task.val}
    assert queries[0].pos[0] not in held  # a training query's positive is never held out
    assert held.isdisjoint(t.text for t in task.train[: task.n_passages])
    assert all(a.startswith(f"T{a.split()[3]} Passage number") for a in task.anchors()[: task.n_passages - 1])  # titled
    ex = task.example(task.train[0], 0, epoch=4)
    assert ex == task.example(task.train[0], 0, epoch=4) and ex.pos == [task.train[0].text]
    assert task.example(task.train[-1], 9, epoch=0).query == queries[0].query
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "too short"}\n')
    folder = long_passages_beir(tmp_path / "beir", n=20)
    beir = corpus_task(TrainConfig(**{**cfg.to_dict(), "distill_corpus": "data"}), {"retrieval": retrieval}, folder)
    assert beir.n_passages + len(beir.val) == 20  # a BEIR --data: its corpus, titles joined as the evaluation's
    assert beir.n_passages == 18 and all(a.startswith("Study ") for a in beir.anchors()[: beir.n_passages])  # titled
    for kw, message in ((dict(distill_from=""), "pass --distill-from MODEL"),
                        (dict(distill_corpus_steps=-1), "--distill-corpus-steps must be 0 or more"),
                        (dict(distill_corpus=str(tmp_path / "nope.jsonl")), "no such file"),
                        (dict(distill_corpus=str(short)), "no passage of 4\\+ words left")):
        with pytest.raises(UserError, match=message):
            corpus_task(TrainConfig(**{**cfg.to_dict(), "distill_corpus": str(corpus), **kw}), {"retrieval": retrieval},
                        data)
    with pytest.raises(UserError, match="has no retrieval lines"):
        corpus_task(cfg, {}, data)



@pytest.mark.shared_data
def test_a_real_beir_folder_is_the_stage_corpus_with_titles(data):
    cfg = TrainConfig(data=str(SCIFACT), distill_from="teacher", distill_corpus="data", seed=1)
    queries = [Example("how tight is a stem bolt", ["Stem bolts are tightened to 5 Nm in steps, crosswise."])]
    beir = corpus_task(cfg, {"retrieval": RetrievalTask(queries, None, None, cfg)}, SCIFACT)
    assert beir.n_passages + len(beir.val) == 5183  # SciFact's corpus, titles joined as the evaluation's
    assert "Microstructural development of human newborn cerebral white matter" in beir.anchors()[0]

def test_the_stage_lowers_the_distillation_loss_on_held_out_passages(data, tiny_model_dir, tmp_path):
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "r", "--distill-corpus-steps", "12", "--max-steps",
                    "2", "--eval-every", "100", "--lr", "3e-3", "--lstm-pooling", "mean", "--no-lstm-highway",
                    "--lstm-embed-dim", "16"))
    run = tmp_path / "r"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["task"] for l in lines if "loss" in l] == ["corpus"] * 12 + ["retrieval"] * 2
    val = {l["step"]: l for l in lines if "val/corpus/distill_loss" in l}
    assert sorted(val) == [0, 12, 14]  # step 0, the stage's end, the last step
    before, after = val[0]["val/corpus/distill_loss"], val[12]["val/corpus/distill_loss"]
    assert after < 0.6 * before, (before, after)
    assert val[12]["val/corpus/cosine"] > val[0]["val/corpus/cosine"] + 0.2
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 14 and results["train_corpus"] == 177 - 16 + 42  # passages less held out, queries
    assert len({l["val/corpus/distill_loss"] for l in val.values()}) == 3
    saved = json.loads((run / "best" / "bge_config.json").read_text())
    assert (saved["pooling"], saved["highway"], saved["embed_size"]) == ("mean", False, 16)  # the knobs reach it
    assert list((tmp_path / "cache").glob("teacher-*/*.safetensors"))  # the teacher's rows kept on disk


def test_killed_mid_stage_resumes_to_identical_weights(data, tiny_model_dir, tmp_path):
    common = args(data, tiny_model_dir, tmp_path, "--distill-corpus-steps", "12", "--max-steps", "4", "--save-every",
                  "1", "--eval-every", "6", "--lr", "3e-3")
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "train.py"), *a], cwd=REPO, capture_output=True,
                                    text=True)
    whole = run(*common, "--run-name", "whole", "--cache-dir", str(tmp_path / "cache-whole"))
    assert whole.returncode == 0, whole.stderr
    killed_at = start_and_kill([sys.executable, str(REPO / "train.py"), *common, "--run-name", "killed", "--cache-dir",
                                str(tmp_path / "cache-killed")], tmp_path / "killed", at_step=3, cwd=REPO)
    assert 3 <= killed_at < 12  # inside the stage
    (store,) = (tmp_path / "cache-killed").glob("teacher-*")
    # the pieces of every step up to the saved state (passages come from the corpus cache): flushed with each state,
    # so the resumed run reads them
    assert len(read_store(store)) >= killed_at * 8
    resumed = run("--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {killed_at}" in " ".join(resumed.stderr.split())
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    logged = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in logged if "loss" in l] == list(range(1, 17))
    assert [l["task"] for l in logged if "loss" in l] == ["corpus"] * 12 + ["retrieval"] * 4
