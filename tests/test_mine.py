"""Hard-negative mining: never a positive (by id, by duplicated or near-duplicated text), only the asked ranks,
the same file for the same seed, and a mined file that splits and evaluates exactly as its BEIR folder."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bge.batching import normalise
from bge.bm25 import BM25
from bge.config import parse_args
from bge.data import examples_from_beir, load_beir
from bge.embedder import Embedder
from bge.errors import UserError
from bge.evaluation import encode_corpus
from bge.mine import (filter_candidates, fuse, load_input, main, mine, parse_margin, parse_range, sample,
                      threshold)
from bge.tasks import load_tasks
from conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
CHAIN_QUERY = "how often should I replace a bike chain"
CHAIN = ("Measure chain wear with a checker every 1,000 km and replace the chain at 0.5% stretch, before it wears out "
         "the cassette and chainrings.")
NEAR = CHAIN.replace("1,000", "1,500")  # one token changed: all-MiniLM-L6-v2 scores it 0.005 below CHAIN


def write_beir(folder: Path, n_queries: int = 30) -> Path:
    """A BEIR folder from the example file's first lines, plus copies of the chain passage: the same text under
    another id, a case/whitespace variant, and a near-duplicate."""
    lines = [json.loads(l) for l in (REPO / "examples" / "bike_repair.jsonl").read_text().splitlines()[:n_queries]]
    corpus, queries, qrels = {}, {"q-chain": CHAIN_QUERY}, [("q-chain", "chain")]
    for i, line in enumerate(lines):
        queries[f"q{i}"] = line["query"]
        for j, text in enumerate(line["pos"]):
            corpus[f"d{i}-{j}"] = text
            qrels.append((f"q{i}", f"d{i}-{j}"))
    corpus |= {"chain": CHAIN, "chain-copy": CHAIN, "chain-shouty": "  " + CHAIN.upper().replace(" ", "   "),
               "chain-near": NEAR}
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "text": t}) + "\n" for d, t in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in queries.items()))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))
    return folder


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("beir") / "bikes")


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.load(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One embedding cache for the module: the corpus is encoded once, however often it is mined."""
    return tmp_path_factory.mktemp("cache")


def mined(embedder, folder, cache, **kw):
    data = load_beir(folder, "train")
    return mine(embedder, data, examples_from_beir(data), cache_dir=cache, **kw)


def test_filter_candidates_names_what_it_removes():
    texts = {"p": "The Positive", "p2": "the   positive ", "x": "other", "x2": "OTHER", "y": "close", "z": "far"}
    candidates = [("p", 0.9), ("p2", 0.9), ("x", 0.8), ("x2", 0.8), ("y", 0.69), ("z", 0.3)]
    kept, removed = filter_candidates(candidates, texts, {"p"}, ["The Positive"], max_score=0.85)
    assert kept == [2, 4, 5] and dict(removed) == {"positive id": 1, "positive text": 1, "duplicate": 1}
    kept, removed = filter_candidates(candidates, texts, {"p"}, ["The Positive"], max_score=0.65)
    assert kept == [5] and dict(removed) == {"positive id": 1, "positive text": 1, "margin": 3}
    kept, removed = filter_candidates(candidates, texts, set(), ["unrelated"], max_score=float("inf"))
    assert kept == [0, 2, 4, 5] and dict(removed) == {"duplicate": 2}  # a copy of a kept passage is dropped


def test_margin_and_range_parsing():
    assert parse_range("10-200") == (10, 200) and parse_range(" 0 - 5 ") == (0, 5)
    assert parse_margin("0.05") == (0.05, False) and parse_margin("5%") == (0.05, True)
    assert threshold(0.8, (0.05, False)) == pytest.approx(0.75) and threshold(0.8, (0.05, True)) == pytest.approx(0.76)
    assert threshold(0.8, None) == float("inf")
    for bad in ("200-10", "5", "a-b", "3-3"):
        with pytest.raises(Exception, match="A-B"):
            parse_range(bad)
    for bad in ("-0.1", "100%", "x"):
        with pytest.raises(Exception, match="margin"):
            parse_margin(bad)


def test_sample_is_a_pure_function_of_seed_and_query():
    kept = list(range(3, 40))
    a = sample(kept, 5, seed=1, qid="q7")
    assert a == sample(kept, 5, seed=1, qid="q7") and a == sorted(a) and len(set(a)) == 5 and set(a) <= set(kept)
    assert a != sample(kept, 5, seed=2, qid="q7") or a != sample(kept, 5, seed=3, qid="q7")
    assert sample(kept[:4], 5, seed=1, qid="q7") == kept[:4]


def test_mining_never_emits_a_positive_even_duplicated_or_near_duplicated(beir, minilm, cache):
    lines, report = mined(minilm, beir, cache, negatives=1000, rank_range=(0, 1000))
    data = load_beir(beir, "train")
    for line in lines:
        positives = {normalise(t) for t in line["pos"]}
        assert not positives & {normalise(t) for t in line["neg"]}, line["qid"]
        assert not set(data.qrels[line["qid"]]) & set(line["mined"]["ids"])
    chain = next(l for l in lines if l["qid"] == "q-chain")
    # the copy and the shouty variant are removed as positives by text; the near-duplicate only by a margin
    assert {"chain", "chain-copy", "chain-shouty"}.isdisjoint(chain["mined"]["ids"]) and "chain-near" in chain["mined"]["ids"]
    assert report["removed"]["positive id"] == len(lines) and report["removed"]["positive text"] == 2
    with_margin, report = mined(minilm, beir, cache, negatives=1000, rank_range=(0, 1000), margin=(0.05, False))
    chain = next(l for l in with_margin if l["qid"] == "q-chain")
    assert "chain-near" not in chain["mined"]["ids"] and report["removed"]["margin"] >= 1
    assert all(s <= l["mined"]["positive_score"] - 0.05 + 1e-6 for l in with_margin for s in l["mined"]["scores"])


def test_mining_honours_the_rank_range_and_the_seed(beir, minilm, cache):
    data = load_beir(beir, "train")
    examples = examples_from_beir(data)
    lines, report = mine(minilm, data, examples, negatives=1000, rank_range=(3, 12), cache_dir=cache)
    ids = list(data.corpus)
    corpus = encode_corpus(minilm, data.corpus, cache_dir=cache).emb  # the embeddings mine() used; the order is ours
    queries = torch.from_numpy(minilm.encode([ex.query for ex in examples], is_query=True))
    assert report["candidates"] == 9 * len(examples)
    for ex, q, line in zip(examples, queries, lines):
        order = sorted(range(len(ids)), key=lambda j: -float(corpus[j] @ q))  # brute force: every score, sorted
        expected, seen = [], {normalise(t) for t in ex.pos}  # no positive, and each text once
        for r, j in enumerate(order[3:12], start=4):
            if ids[j] not in data.qrels[ex.qid] and normalise(data.corpus[ids[j]]) not in seen:
                expected.append((r, ids[j]))
                seen.add(normalise(data.corpus[ids[j]]))
        assert list(zip(line["mined"]["ranks"], line["mined"]["ids"])) == expected, ex.qid
        assert all(4 <= r <= 12 for r in line["mined"]["ranks"])
    three, _ = mine(minilm, data, examples, negatives=3, rank_range=(3, 12), seed=5, cache_dir=cache)
    again, _ = mine(minilm, data, examples, negatives=3, rank_range=(3, 12), seed=5, cache_dir=cache)
    other, _ = mine(minilm, data, examples, negatives=3, rank_range=(3, 12), seed=6, cache_dir=cache)
    assert three == again and three != other
    for small, full in zip(three, lines):
        assert len(small["neg"]) == 3 and set(small["mined"]["ids"]) <= set(full["mined"]["ids"])


def test_bm25_mining_takes_bm25s_ranks_and_the_models_scores(beir, minilm, cache):
    import bm25s

    from bge.bm25 import words

    data = load_beir(beir, "train")
    examples = examples_from_beir(data)
    lines, report = mine(minilm, data, examples, negatives=1000, rank_range=(2, 12), cache_dir=cache, retriever="bm25")
    assert report["retriever"] == "bm25"
    ids = list(data.corpus)
    oracle = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
    oracle.index([words(data.corpus[d]) for d in ids], show_progress=False)
    corpus = encode_corpus(minilm, data.corpus, cache_dir=cache).emb
    queries = torch.from_numpy(minilm.encode([ex.query for ex in examples], is_query=True))
    dense = [line["mined"]["ids"] for line in mine(minilm, data, examples, negatives=1000, rank_range=(2, 12),
                                                   cache_dir=cache)[0]]
    assert dense != [line["mined"]["ids"] for line in lines]  # another ranking, not the model's
    for ex, q, line in zip(examples, queries, lines):
        s = oracle.get_scores(words(ex.query))
        order = [j for j in sorted(range(len(ids)), key=lambda j: (-s[j], j)) if s[j] > 0]
        expected, seen = [], {normalise(t) for t in ex.pos}
        for r, j in enumerate(order[2:12], start=3):
            if ids[j] not in data.qrels[ex.qid] and normalise(data.corpus[ids[j]]) not in seen:
                expected.append((r, ids[j]))
                seen.add(normalise(data.corpus[ids[j]]))
        assert list(zip(line["mined"]["ranks"], line["mined"]["ids"])) == expected, ex.qid
        # the scores the margin filter compares are the model's cosines, not BM25's
        row = {d: i for i, d in enumerate(ids)}
        np.testing.assert_allclose(line["mined"]["scores"], [float(corpus[row[d]] @ q) for d in line["mined"]["ids"]],
                                   atol=1e-4)
    with_margin, report = mine(minilm, data, examples, negatives=1000, rank_range=(2, 12), cache_dir=cache,
                               retriever="bm25", margin=(0.05, True))
    assert report["removed"]["margin"] >= 1
    assert all(s <= 0.95 * l["mined"]["positive_score"] + 1e-6 for l in with_margin for s in l["mined"]["scores"])


def test_hybrid_mining_fuses_the_bm25_and_model_rankings(beir, minilm, cache):
    # reciprocal rank fusion, k = 60: y is second in both rankings, which beats first in one
    assert fuse([["x", "y"], ["w", "y", "z"]]) == ["y", "x", "w", "z"]
    assert fuse([["x"], ["y"]]) == ["x", "y"] and fuse([]) == []  # ties in the order first met
    data = load_beir(beir, "train")
    examples = examples_from_beir(data)
    ids = list(data.corpus)
    index = BM25([data.corpus[d] for d in ids])
    corpus = encode_corpus(minilm, data.corpus, cache_dir=cache).emb
    queries = torch.from_numpy(minilm.encode([ex.query for ex in examples], is_query=True))
    lines, report = mine(minilm, data, examples, negatives=1000, rank_range=(0, 12), cache_dir=cache,
                         retriever="hybrid")
    assert report["retriever"] == "hybrid"
    differs = set()
    for ex, q, line in zip(examples, queries, lines):
        lexical = [ids[i] for i, _ in index.top(ex.query, 12)]
        dense = sorted(ids, key=lambda d: -float(corpus[ids.index(d)] @ q))[:12]
        fused = fuse([lexical, dense])[:12]
        # the fused top 12 in order, less what the filters drop: positives and repeated texts
        expected, seen = [], {normalise(t) for t in ex.pos}
        for d in fused:
            if d not in data.qrels[ex.qid] and normalise(data.corpus[d]) not in seen:
                expected.append(d)
                seen.add(normalise(data.corpus[d]))
        assert line["mined"]["ids"] == expected, ex.qid
        differs |= {name for name, r in (("bm25", lexical), ("model", dense)) if r != fused}
    assert differs == {"bm25", "model"}  # the fusion is neither ranking alone


def load_retrieval(cfg, run_dir):
    """(train examples, validation set, test set, split) of a run's retrieval task, as train.py loads them."""
    tasks, split = load_tasks(cfg, run_dir)
    t = tasks["retrieval"]
    return t.train, t.val, t.test_data, split


def test_cli_writes_a_file_that_splits_and_evaluates_as_the_beir_folder(beir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "mined.jsonl"
    main(["--data", str(beir), "--model", str(tiny_model_dir), "--out", str(out), "--negatives", "4", "--range", "2-20",
          "--no-cache"])
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["queries"] == 31 and report["written"] == sum(len(json.loads(l)["neg"]) for l in out.read_text().splitlines())
    assert "removed: positive id" in capsys.readouterr().err
    common = ["--val-ratio", "0.2", "--test-ratio", "0.2"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    from_beir = load_retrieval(parse_args(["--data", str(beir), *common])[0], tmp_path / "a")
    from_mined = load_retrieval(parse_args(["--data", str(out), "--corpus", str(beir), *common])[0], tmp_path / "b")
    assert from_beir[3] == from_mined[3]  # the same split, by BEIR query id
    for a, b in zip(from_beir[1:3], from_mined[1:3]):
        assert a.fingerprint() == b.fingerprint() and a.corpus == load_beir(beir, "train").corpus
    assert Counter(ex.qid for ex in from_beir[0]) == Counter(ex.qid for ex in from_mined[0])
    assert all(ex.neg for ex in from_mined[0]) and not any(ex.neg for ex in from_beir[0])
    lexical = tmp_path / "lexical.jsonl"
    main(["--data", str(beir), "--model", str(tiny_model_dir), "--out", str(lexical), "--negatives", "4", "--range",
          "2-20", "--no-cache", "--retriever", "bm25"])
    assert json.loads(lexical.with_suffix(".report.json").read_text())["retriever"] == "bm25"
    assert "passages by BM25, ranks 3-20" in " ".join(capsys.readouterr().err.split())
    assert lexical.read_text() != out.read_text()


@pytest.mark.shared_data
def test_scifact_mined_format_gives_the_beir_split_and_test_set(tmp_path):
    """On the real SciFact train split: lines as bge.mine writes them (here with arbitrary negatives) carve the same
    validation and test queries, over the same 5,183-passage corpus, as the BEIR folder."""
    scifact = SHARED_DATA / "scifact"
    data = load_beir(scifact, "train")
    texts = list(data.corpus.values())
    lines = [{"qid": ex.qid, "query": ex.query, "pos": ex.pos, "neg": texts[i : i + 3]}
             for i, ex in enumerate(examples_from_beir(data))]
    mined_file = tmp_path / "scifact-mined.jsonl"
    mined_file.write_text("".join(json.dumps(l) + "\n" for l in lines))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = load_retrieval(parse_args(["--data", str(scifact)])[0], tmp_path / "a")
    b = load_retrieval(parse_args(["--data", str(mined_file), "--corpus", str(scifact)])[0], tmp_path / "b")
    assert a[3] == b[3] and len(a[3]["tasks"]["retrieval"]["test"]) == len(b[2].queries) == 121
    assert a[2].fingerprint() == b[2].fingerprint() and len(b[2].corpus) == 5183
    assert a[1].fingerprint() == b[1].fingerprint()


def test_out_that_is_an_input_is_refused_before_any_work(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "q", "pos": ["p"]}\n')
    for out in (data, tmp_path / "." / "train.jsonl"):
        with pytest.raises(UserError, match="is an input of this run"):
            main(["--data", str(data), "--out", str(out), "--model", "nowhere"])
    assert data.read_text() == '{"query": "q", "pos": ["p"]}\n'
    with pytest.raises(UserError, match="--negatives: must be in \\[1, inf\\), got 0"):
        main(["--data", str(data), "--out", str(tmp_path / "o.jsonl"), "--negatives", "0"])


def test_a_query_on_several_lines_is_mined_with_all_its_positives(minilm, cache, tmp_path):
    """FlagEmbedding files often give one line per (query, positive): the evaluation set folds the lines into one
    query, and mining must look its positives up there (it raised KeyError on the folded line) and never hand one
    line another line's positive as a negative."""
    lines = [json.loads(l) for l in (REPO / "examples" / "bike_repair.jsonl").read_text().splitlines()[:20]]
    rows = [{"query": CHAIN_QUERY, "pos": [CHAIN]}] + [{"query": l["query"], "pos": l["pos"]} for l in lines]
    rows.append({"query": CHAIN_QUERY, "pos": [NEAR]})  # the same query again, with the near-duplicate as positive
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, examples = load_input(str(path), "train", "", True)
    assert data.n_merged == 1
    out, _ = mine(minilm, data, examples, negatives=1000, rank_range=(0, 1000), cache_dir=cache)
    chain = [l for l in out if l["query"] == CHAIN_QUERY]
    assert len(chain) == 2 and all(l["neg"] for l in chain)
    for l in chain:  # NEAR is the second line's positive, CHAIN the first's: a negative of neither
        assert not {normalise(CHAIN), normalise(NEAR)} & {normalise(t) for t in l["neg"]}
