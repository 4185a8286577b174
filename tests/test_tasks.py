"""Task types end to end on a tiny random model: STS pairs, classification rows (with and without a head), mixed
files, the sampler over tasks, splits that keep shared texts together, GradCache for every task, regularisation
knobs, and evaluate.py's classification metrics and --explain diagnostics."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from bge.batching import split_by_keys
from bge.config import parse_args
from bge.data import Labelled, Pair
from bge.embedder import Embedder
from bge.errors import UserError
from bge.evaluation import ClassifierHead
from bge.step import forward_backward
from bge.tasks import ClassificationTask, STSTask, TaskSampler, load_tasks

REPO = Path(__file__).resolve().parents[1]
TICKETS = REPO / "examples" / "bike_tickets.jsonl"
REPAIR = REPO / "examples" / "bike_repair.jsonl"


def sts_pairs(n: int, start: int = 0) -> list[tuple[str, str, float]]:
    """n invented scored pairs, every sentence distinct (the real STS-B is in ../shared/data, not needed here)."""
    who = ["a cyclist", "the baker", "a gardener", "two children", "the mechanic", "a chef", "the dog"]
    does = ["fixes a wheel", "bakes bread", "waters the roses", "plays outside", "oils a chain", "stirs soup"]
    return [(f"{who[i % 7]} {does[i % 6]} on day {i}", f"{who[(i * 3) % 7]} {does[(i * 5) % 6]} at hour {i}",
             float(i % 6)) for i in range(start, start + n)]


def sts_lines(n: int, start: int = 0) -> list[str]:
    return [json.dumps({"sentence1": a, "sentence2": b, "score": s}) for a, b, s in sts_pairs(n, start)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """40 STS pairs, 40 classification rows and 40 retrieval lines, interleaved in one file."""
    lines = [x for trio in zip(sts_lines(40), TICKETS.read_text().splitlines()[:40], REPAIR.read_text().splitlines()[:40])
             for x in trio]
    path = tmp_path_factory.mktemp("data") / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def args(data, model, out, *extra):
    return ["--data", str(data), "--model", str(model), "--out-dir", str(out), "--batch-size", "8", "--group-size",
            "2", "--max-passage-length", "32", "--max-query-length", "16", "--eval-batch-size", "64", "--lr", "1e-3",
            *extra]


# ---- the sampler and the split --------------------------------------------------------------------------------
def test_task_sampler_draws_one_task_per_batch_and_covers_every_item(mixed, tmp_path):
    cfg, _ = parse_args(["--data", str(mixed), "--batch-size", "8"])
    tasks, split = load_tasks(cfg, tmp_path)
    sampler = TaskSampler(tasks, 8, seed=3)
    assert len(sampler) == sum(-(-len(t.anchors()) // 8) for t in tasks.values())
    seen = Counter()
    order = []
    for step in range(len(sampler)):
        epoch, name, indices = sampler.batch(step)
        assert epoch == 0 and len(indices) <= 8 and len(set(indices)) == len(indices)
        seen.update((name, i) for i in indices)
        order.append(name)
    assert set(seen.values()) == {1} and len(seen) == sum(len(t.anchors()) for t in tasks.values())
    assert order != sorted(order, key=list(tasks).index)  # interleaved, not one task after another
    assert [sampler.batch(s) for s in range(5)] == [TaskSampler(tasks, 8, seed=3).batch(s) for s in range(5)]
    assert sampler.batch(len(sampler))[0] == 1  # the next epoch


def test_single_task_sampler_is_the_plain_sampler(tmp_path):
    from bge.batching import Sampler
    cfg, _ = parse_args(["--data", str(REPAIR)])
    tasks, _ = load_tasks(cfg, tmp_path)
    ours, plain = TaskSampler(tasks, 16, seed=5), Sampler(tasks["retrieval"].train, 16, seed=5)
    assert all(ours.batch(s) == (*plain.batch(s)[:1], "retrieval", plain.batch(s)[1]) for s in range(40))


def test_split_keeps_items_that_share_a_text_together():
    keys = [{1, 2}, {2}, {3}, {4}, {4, 5}, {5}, {6}, {7}, {8}, {9}]
    parts = split_by_keys(keys, 0.3, 0.3, seed=0)
    assert sorted(sum(parts.values(), [])) == list(range(10))
    where = {i: name for name, idx in parts.items() for i in idx}
    assert where[0] == where[1] and where[3] == where[4] == where[5]
    assert parts == split_by_keys(keys, 0.3, 0.3, seed=0)


def test_mixed_split_is_per_task_and_saved(mixed, tmp_path):
    cfg, _ = parse_args(["--data", str(mixed)])
    tasks, split = load_tasks(cfg, tmp_path)
    assert list(tasks) == ["retrieval", "sts", "classification"]
    assert json.loads((tmp_path / "split.json").read_text()) == split
    for t in tasks.values():
        assert 26 <= len(t.train) <= 30 and t.val is not None and t.test_data is not None
    val_rows = set(tasks["classification"].val.texts)
    assert not val_rows & {r.text for r in tasks["classification"].train}
    sts = tasks["sts"]
    train_sentences = {s for p in sts.train for s in (p.sentence1, p.sentence2)}
    assert not train_sentences & (set(sts.test_data.sentence1) | set(sts.test_data.sentence2))


def test_colliding_numeric_ids_of_two_tasks_never_leak_across_the_split(tmp_path):
    """Retrieval lines whose qids are 41-80 (numeric, as bge.mine writes BEIR ids) beside classification rows on lines
    41-80: one shared id space put a query in train because the classification row of its number was there."""
    rows = TICKETS.read_text().splitlines()[:40]
    queries = [dict(json.loads(l), qid=41 + (7 * i) % 40) for i, l in enumerate(REPAIR.read_text().splitlines()[:40])]
    data = tmp_path / "collide.jsonl"
    data.write_text("\n".join([json.dumps(q) for q in queries] + rows) + "\n")
    cfg, _ = parse_args(["--data", str(data), "--val-ratio", "0.25", "--test-ratio", "0.25"])
    tasks, split = load_tasks(cfg, tmp_path)
    r, c = tasks["retrieval"], tasks["classification"]
    held = set(r.val.queries) | set(r.test_data.queries)
    assert len(held) == 20 and not held & {ex.qid for ex in r.train}  # no held-out query is trained on
    assert len(r.train) == 20 and len(c.train) == 20
    assert not (set(c.val.texts) | set(c.test_data.texts)) & {x.text for x in c.train}
    for task, parts in split["tasks"].items():  # each id once per task, in one part
        ids = parts["train"] + parts["val"] + parts["test"]
        assert sorted(ids, key=int) == [str(i) for i in range(41, 81)]
    # a split.json from before (one id list for all tasks) resumes a single-task run, and refuses a mixed one
    old = {"seed": 42, "val_ratio": 0.25, "test_ratio": 0.25, **split["tasks"]["retrieval"]}
    (tmp_path / "split.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="an old split .*cannot be resumed exactly"):
        load_tasks(cfg, tmp_path)
    only = tmp_path / "only.jsonl"
    only.write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    tasks, _ = load_tasks(parse_args(["--data", str(only)])[0], tmp_path)
    assert set(tasks["retrieval"].test_data.queries) == set(old["test"])


def test_validation_and_test_truncate_queries_at_max_query_length(tiny_model_dir, tmp_path, monkeypatch):
    """Training truncates queries at --max-query-length; validation and test must see the same queries."""
    cfg, _ = parse_args(["--data", str(REPAIR), "--max-query-length", "7", "--max-passage-length", "40",
                         "--out-dir", str(tmp_path)])
    task = load_tasks(cfg, tmp_path)[0]["retrieval"]
    seen = []
    real = Embedder.encode
    monkeypatch.setattr(Embedder, "encode", lambda self, texts, **kw: seen.append(
        (kw.get("is_query", False), kw.get("max_length"))) or real(self, texts, **kw))
    emb = Embedder.load(str(tiny_model_dir), device="cpu")
    task.validate(emb, False)
    task.test_scores(emb, False, tmp_path)
    # queries encoded twice (validation and test); the corpus once: the test reuses validation's (CorpusCache)
    assert {m for q, m in seen if q} == {7} and {m for q, m in seen if not q} == {40}
    assert sum(q for q, _ in seen) == 2 and sum(not q for q, _ in seen) == 1
    inputs, _ = task.micro_batch(list(range(8)), 0, emb.tokenizer, torch.device("cpu"))
    assert max(map(len, inputs["q"])) <= 7  # training's own truncation, for comparison
    from bge.evaluation import evaluate_retrieval  # evaluate.py --max-query-length takes the same path
    seen.clear()
    evaluate_retrieval(emb, task.val, ks=(10,), max_length=30, query_max_length=5)
    assert {m for q, m in seen if q} == {5} and {m for q, m in seen if not q} == {30}


# ---- batches and losses ------------------------------------------------------------------------------------------
def micro_batch_grads(task, tiny_model_dir, chunk):
    emb = Embedder.load(str(tiny_model_dir), device="cpu")
    emb.model.set_dropout(0.0, 0.0)
    emb.model.train()
    inputs, loss_fn = task.micro_batch(list(range(8)), 0, emb.tokenizer, torch.device("cpu"))

    def embed(ids):
        input_ids, mask = emb.tokenizer.pad(ids)
        return emb.model.embed(input_ids, mask)

    loss, stats = forward_backward(embed, inputs, loss_fn, chunk_size=chunk)
    head = getattr(task, "head", None)
    grads = [p.grad.clone() for p in list(emb.model.parameters()) + ([head.weight] if head is not None else [])]
    if head is not None:
        head.zero_grad()
    return loss, stats, grads


@pytest.mark.parametrize("kind", ["sts", "sts-mse", "classification", "classification-both"])
def test_every_task_batch_works_with_grad_cache(kind, tiny_model_dir):
    extra = {"sts-mse": ["--sts-loss", "cosine_mse"], "classification-both": ["--classification-loss", "both"]}
    cfg, _ = parse_args(["--data", "x", "--max-passage-length", "32", *extra.get(kind, [])])
    if kind.startswith("sts"):
        task = STSTask([Pair(f"sentence {i} about cats", f"line {i} on {'dogs' if i % 2 else 'cats'}", i % 5, i)
                        for i in range(12)], None, None, cfg)
    else:
        rows = [Labelled(f"text {i} says {['brakes', 'battery', 'refund'][i % 3]}", "abc"[i % 3], i) for i in range(12)]
        task = ClassificationTask(rows, None, None, cfg)
        if kind == "classification-both":
            torch.manual_seed(0)
            task.make_head(32, torch.device("cpu"))
            torch.nn.init.normal_(task.head.weight)
    plain = micro_batch_grads(task, tiny_model_dir, 0)
    cached = micro_batch_grads(task, tiny_model_dir, 3)
    assert torch.isfinite(plain[0]) and plain[0] > 0 and 0 <= plain[1]["acc"] <= 1
    assert torch.allclose(plain[0], cached[0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(plain[2], cached[2]))


def test_classification_positives_share_the_anchor_label_and_other_labels_are_negatives(tiny_model_dir):
    cfg, _ = parse_args(["--data", "x"])
    rows = [Labelled(f"row {i}", "abcd"[i % 4], i) for i in range(16)] + [Labelled("alone", "e", 99)]
    task = ClassificationTask(rows, None, None, cfg)
    assert len(task.rows) == 16 and any("1 classification row(s)" in n for n in task.notes)  # 'alone' has no partner
    tok = Embedder.load(str(tiny_model_dir), device="cpu").tokenizer
    inputs, loss_fn = task.micro_batch(list(range(8)), 0, tok, torch.device("cpu"))
    anchors = [tok.tk.decode(ids, skip_special_tokens=True) for ids in inputs["q"]]
    partners = [tok.tk.decode(ids, skip_special_tokens=True) for ids in inputs["p"]]
    label = {r.text: r.label for r in rows}
    assert all(label[a] == label[p] and a != p for a, p in zip(anchors, partners))


@pytest.mark.parametrize("kind", ["cosent", "cosine_mse"])
def test_sts_batch_loss_pairs_each_gold_score_with_its_own_pair(kind, tiny_model_dir):
    """The loss of STS pairs [5, 2, 7, 0, 3] against the naive formula on those pairs' own gold scores."""
    import torch.nn.functional as F
    cfg, _ = parse_args(["--data", "x", "--sts-loss", kind])
    pairs = [Pair(f"first {i}", f"second {i}", s, i) for i, s in enumerate([0.0, 5.0, 2.0, 4.0, 1.0, 3.0, 2.5, 0.5])]
    task = STSTask(pairs, None, None, cfg)
    tok = Embedder.load(str(tiny_model_dir), device="cpu").tokenizer
    indices = [5, 2, 7, 0, 3]
    inputs, loss_fn = task.micro_batch(indices, 0, tok, torch.device("cpu"))
    assert [tok.tk.decode(x, skip_special_tokens=True) for x in inputs["a"]] == [f"first {i}" for i in indices]
    g = torch.Generator().manual_seed(0)
    a, b = (F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    loss, stats = loss_fn({"a": a, "b": b})
    cos, gold = (a * b).sum(1).tolist(), [pairs[i].score for i in indices]
    if kind == "cosent":
        terms = [20 * (cos[j] - cos[i]) for i in range(5) for j in range(5) if gold[i] > gold[j]]
        naive = torch.logsumexp(torch.tensor([0.0] + terms, dtype=torch.float64), 0)
    else:  # gold mapped from the training range [0, 5] onto [0, 1]
        naive = torch.tensor(sum((c - g / 5.0) ** 2 for c, g in zip(cos, gold)) / 5, dtype=torch.float64)
    assert torch.allclose(loss, naive, atol=1e-9) and 0 <= stats["acc"] <= 1


def synonym_pairs(n: int, seed: int) -> list[tuple[str, str, float]]:
    """Pairs whose gold score counts the words that mean the same: colour i in sentence 1 and animal i in sentence 2
    are synonyms by construction. A random model sees no link between the two vocabularies (Spearman about 0); only
    training on the right gold scores can teach it."""
    import random
    colours, animals = "red blue green black white brown pink gray gold silver".split(), \
        "cat dog cow pig hen fox owl bee ant rat".split()
    rng, out = random.Random(seed), []
    for _ in range(n):
        idx, k = rng.sample(range(10), 3), rng.randrange(4)
        other = idx[:k] + rng.sample([i for i in range(10) if i not in idx], 3 - k)
        rng.shuffle(other)
        out.append((" ".join(colours[i] for i in idx), " ".join(animals[i] for i in other), float(k)))
    return out


def test_an_sts_run_learns_what_its_gold_scores_say(tmp_path, minilm_dir):
    """End to end: after two epochs the held-out Spearman is high where the base model's is about 0. Gold scores
    wired to the wrong pairs, or a loss that ignores them, leave nothing to learn."""
    from conftest import make_tiny_model
    model = make_tiny_model(tmp_path / "model", minilm_dir, pooling="mean", dropout=0.0)
    data, test = tmp_path / "train.jsonl", tmp_path / "test.tsv"
    data.write_text("".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n"
                            for a, b, s in synonym_pairs(120, 0)))
    test.write_text("score\tsentence1\tsentence2\n" + "".join(f"{s}\t{a}\t{b}\n" for a, b, s in synonym_pairs(60, 1)))
    train.main(["--data", str(data), "--test", str(test), "--model", str(model), "--out-dir", str(tmp_path),
                "--run-name", "sts", "--batch-size", "16", "--lr", "3e-3", "--epochs", "2", "--max-passage-length", "16",
                "--val-ratio", "0.1", "--eval-every", "1000", "--explain", "0"])
    results = json.loads((tmp_path / "sts" / "results.json").read_text())
    assert abs(results["base"]["spearman"]) < 0.2 and results["fine_tuned"]["spearman"] > 0.5


# ---- train.py end to end -------------------------------------------------------------------------------------------
def test_sts_run_with_a_test_file(tiny_model_dir, tmp_path):
    data = tmp_path / "sts.tsv"
    data.write_text("score\tsentence1\tsentence2\n" + "".join(f"{s}\t{a}\t{b}\n" for a, b, s in sts_pairs(120)))
    test = tmp_path / "dev.jsonl"
    test.write_text("\n".join(sts_lines(60, start=140)) + "\n")
    train.main(args(data, tiny_model_dir, tmp_path, "--run-name", "sts", "--epochs", "1", "--test", str(test)))
    run = tmp_path / "sts"
    results = json.loads((run / "results.json").read_text())
    assert results["test_pairs"] == 60 and set(results["base"]) == {"spearman", "pearson"}
    assert results["train_sts"] == 102 and "best_val_spearman" in results
    val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if "val/spearman" in l]
    assert [v["step"] for v in val] == [0, 13]
    split = json.loads((run / "split.json").read_text())
    parts = split["tasks"]["sts"]
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (102, 18, 0)


def test_classification_run_with_head_exports_a_loadable_folder_and_resumes(tiny_model_dir, tmp_path):
    def fit(name, steps):  # a constant learning rate, so that 2 steps + 2 resumed are the same as 4
        train.main(args(TICKETS, tiny_model_dir, tmp_path, "--classification-loss", "both", "--schedule", "constant",
                        "--warmup-ratio", "0", "--eval-every", "2", "--max-steps", str(steps), "--run-name", name))

    fit("whole", 4)
    run = tmp_path / "whole"
    results = json.loads((run / "results.json").read_text(), parse_constant=pytest.fail)  # no bare NaN
    assert results["test_rows"] == 36 and {"knn_macro_f1", "probe_accuracy", "head_accuracy"} <= set(results["fine_tuned"])
    assert results["base"]["head_accuracy"] is None  # the base model has no head: null, and a note says so
    assert results["undefined"]["base.head_accuracy"] == "the base model has no classification head"
    head = ClassifierHead.load(run / "final")
    assert head.labels == sorted({json.loads(l)["label"] for l in TICKETS.read_text().splitlines()})
    assert head.weight.shape == (6, 32) and head.weight.abs().sum() > 0
    # the exported folder stays a plain model folder: sentence-transformers (transformers' AutoModel inside) loads it
    from sentence_transformers import SentenceTransformer
    ours = Embedder.load(str(run / "final"), device="cpu").encode(["my battery is dead"])
    st = SentenceTransformer(str(run / "final"), device="cpu").encode(["my battery is dead"])
    assert abs(ours - st).max() < 1e-5
    # the head is part of the resumable state: 2 steps, then 2 more on resume, give the 4-step run's head and weights
    fit("split", 2)
    train.main(["--resume", str(tmp_path / "split"), "--max-steps", "4"])
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(tmp_path / "split" / "final" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert torch.allclose(ClassifierHead.load(tmp_path / "split" / "final").weight, head.weight, atol=1e-6)


def test_mixed_run_validates_every_task_and_reports_each(mixed, tiny_model_dir, tmp_path):
    train.main(args(mixed, tiny_model_dir, tmp_path, "--run-name", "mix", "--epochs", "1", "--explain", "2"))
    run = tmp_path / "mix"
    results = json.loads((run / "results.json").read_text())
    assert set(results["tasks"]) == {"retrieval", "sts", "classification"} and "best_val_mean" in results
    assert "diagnostics" in results["tasks"]["retrieval"] and len(results["tasks"]["retrieval"]["diagnostics"]["changes"]) <= 2
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    val = [l for l in lines if "val/sts/spearman" in l]
    assert len(val) == 2 and all("val/retrieval/ndcg@10" in l and "val/classification/knn_macro_f1" in l for l in val)
    assert {l["task"] for l in lines if "loss" in l} == {"retrieval", "sts", "classification"}


def test_dropout_override_and_l1(tiny_model_dir, tmp_path):
    common = args(TICKETS, tiny_model_dir, tmp_path, "--max-steps", "4", "--eval-every", "100", "--test-ratio", "0",
                  "--hidden-dropout", "0", "--attention-dropout", "0.0")
    train.main([*common, "--run-name", "plain"])
    train.main([*common, "--run-name", "l1", "--l1", "1e-3"])
    config = json.loads((tmp_path / "plain" / "final" / "config.json").read_text())
    assert config["hidden_dropout_prob"] == 0.0 and config["attention_probs_dropout_prob"] == 0.0
    norms = {}
    for name in ("plain", "l1"):
        w = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        norms[name] = sum(v.abs().sum().item() for k, v in w.items() if v.ndim >= 2)
    assert norms["l1"] < 0.9 * norms["plain"]


def test_bad_classification_and_sts_input_is_one_error_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *args(bad, tiny_model_dir, tmp_path)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"{bad}:2: missing field 'label'" in r.stderr
    one_label = tmp_path / "one.jsonl"
    one_label.write_text("".join(json.dumps({"text": f"t{i}", "label": "x"}) + "\n" for i in range(20)))
    r = subprocess.run([sys.executable, str(REPO / "train.py"), *args(one_label, tiny_model_dir, tmp_path)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "at least 2 labels" in r.stderr


# ---- evaluate.py -----------------------------------------------------------------------------------------------
def run_eval(*argv):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_evaluate_classification_cross_validation_and_reference(tiny_model_dir, tmp_path):
    rows = TICKETS.read_text().splitlines()
    (tmp_path / "ref.jsonl").write_text("\n".join(rows[:180]) + "\n")
    (tmp_path / "held.jsonl").write_text("\n".join(rows[180:]) + "\n")
    r = run_eval("--model", tiny_model_dir, "--data", TICKETS, "--out", tmp_path / "cv.json")
    assert r.returncode == 0, r.stderr
    assert "kNN macro-F1" in r.stdout and "5-fold cross-validation" in r.stdout
    cv = json.loads((tmp_path / "cv.json").read_text())
    assert cv["dataset"]["kind"] == "classification" and cv["dataset"]["n_rows"] == 240
    assert set(cv["models"][0]["metrics"]) == {"knn_accuracy", "knn_macro_f1", "probe_accuracy", "probe_macro_f1"}
    r = run_eval("--model", tiny_model_dir, "--data", tmp_path / "held.jsonl", "--reference", tmp_path / "ref.jsonl",
                 "--out", tmp_path / "ref.json")
    assert r.returncode == 0, r.stderr
    assert "fitted on ref.jsonl (180 rows)" in " ".join(r.stdout.split())
    ref = json.loads((tmp_path / "ref.json").read_text())["dataset"]
    assert ref["n_rows"] == 60 and ref["n_reference_rows"] == 180 and cv["dataset"]["folds"] == 5


def test_evaluate_explain_two_models(tiny_model_dir, tmp_path, minilm_dir):
    from conftest import make_tiny_model
    other = make_tiny_model(tmp_path / "other", minilm_dir, seed=1)
    data = tmp_path / "retrieval.jsonl"
    data.write_text("".join(REPAIR.read_text().splitlines(keepends=True)[:40]))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "val": [], "test": [str(i) for i in range(1, 21)]}))
    r = run_eval("--model", tiny_model_dir, "--model", other, "--data", data, "--queries", split, "--explain", "3",
                 "--precision", "0.5", "--plot", tmp_path / "scores.png", "--out", tmp_path / "x.json",
                 "--cache-dir", tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "why it changed" in r.stdout and "threshold for precision 0.5" in r.stdout and "non-relevant" in r.stdout
    out = json.loads((tmp_path / "x.json").read_text())
    assert out["dataset"]["n_queries"] == 20 and len(out["diagnostics"]["changes"]) <= 3
    moves = [abs(c["change"]) for c in out["diagnostics"]["changes"]]
    assert moves == sorted(moves, reverse=True)
    r = run_eval("--model", tiny_model_dir, "--data", data, "--explain", "3")
    assert r.returncode == 2 and "--explain compares two models" in r.stderr


@pytest.mark.parametrize("flag,value,message", [("--threshold-precision", "1.5", r"--threshold-precision: .* \(0, 1\]"),
                                                ("--l1", "-1", r"--l1: l1 must be in \[0, inf\), got -1.0"),
                                                ("--hidden-dropout", "1.0", r"hidden_dropout must be in \(-inf, 1\)")])
def test_out_of_range_knobs_fail_before_training(flag, value, message, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=message):
        train.main(args(TICKETS, tiny_model_dir, tmp_path, flag, value))


def test_retrieval_batches_follow_flagembedding_types(tiny_model_dir, tmp_path):
    lines = [{"query": f"question {i}", "pos": [f"answer {i}"], "neg": [f"wrong {i}", f"off {i}", f"far {i}"],
              "type": ["symmetric_sts", "only_1neg"][i % 2], "prompt": "Alike: "} for i in range(8)]
    data = tmp_path / "types.jsonl"
    data.write_text("".join(json.dumps(l) + "\n" for l in lines))
    cfg, _ = parse_args(["--data", str(data), "--val-ratio", "0", "--test-ratio", "0", "--group-size", "4"])
    task = load_tasks(cfg, tmp_path)[0]["retrieval"]
    assert any("4 only_1neg, 4 symmetric_sts line(s)" in n for n in task.notes)
    tok = Embedder.load(str(tiny_model_dir), device="cpu", passage_prompt="Doc: ").tokenizer
    inputs, _ = task.micro_batch(list(range(8)), 0, tok, torch.device("cpu"))
    passages = [tok.tk.decode(ids, skip_special_tokens=True) for ids in inputs["p"]]
    assert len(passages) == 4 * 4 + 4 * 2  # symmetric_sts: group of 4; only_1neg: its positive and one negative
    assert sum(p.startswith("alike :") for p in passages) == 16  # the instruction on the symmetric lines' passages
    assert sum(p.startswith("doc :") for p in passages) == 8  # the passage instruction on the others' only
