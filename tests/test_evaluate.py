"""evaluate.py and bge/evaluation.py: parity with sentence-transformers' evaluators on real data, the embedding
cache, query instructions, identical-id skipping, data detection and the CLI's output and errors."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bge import Embedder, UserError, malloc
from bge.data import DataError, RetrievalData, STSData, load_beir, load_eval_data, load_sts
from bge.evaluation import (CACHE_FORMAT, CorpusCache, corpus_hash, effective_max_length, encode_corpus,
                            encode_precision, evaluate_retrieval, evaluate_sts, search)
from bge.model import Encoder, ModelConfig
from bge.tokenizer import Tokenizer
from bge.weights import save
from conftest import FIXTURES, SHARED_DATA

REPO = Path(__file__).resolve().parents[1]
MAX_LENGTH = 256  # all-MiniLM-L6-v2's own, and what sentence-transformers uses for it


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    assert path.exists(), f"test data missing: {path} (the shared data folder must sit beside the repo)"
    return path


# ---- parity with sentence-transformers on real data -------------------------------------------------------
@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return Embedder.load(str(minilm_dir), device="cpu")


@pytest.fixture(scope="module")
def st_minilm(minilm_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    st.max_seq_length = MAX_LENGTH
    return st


def scifact_slice(n_queries: int = 100, n_other: int = 400) -> RetrievalData:
    """The first n_queries train queries, with a corpus of their relevant documents plus the first n_other others
    in file order: the full corpus takes minutes to encode on a CPU (benchmarks/evaluate.py does it)."""
    full = load_beir(shared("scifact"), "train")
    qids = list(full.qrels)[:n_queries]
    relevant = {d for q in qids for d in full.qrels[q]}
    others = [d for d in full.corpus if d not in relevant][:n_other]
    corpus = {d: t for d, t in full.corpus.items() if d in relevant or d in set(others)}
    return RetrievalData({q: full.queries[q] for q in qids}, corpus, {q: full.qrels[q] for q in qids},
                         name="scifact-slice")


@pytest.mark.shared_data
def test_retrieval_matches_sentence_transformers(minilm, st_minilm):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    data = scifact_slice()
    relevant = {q: {d for d, g in r.items() if g > 0} for q, r in data.qrels.items()}
    # sentence-transformers' MAP@k divides by min(k, R), trec_eval's (ours) by R: equal while R <= k
    assert max(len(r) for r in relevant.values()) <= 100 and len(data.corpus) > 450
    ours = evaluate_retrieval(minilm, data, ks=(10, 100), batch_size=64, max_length=MAX_LENGTH)
    evaluator = InformationRetrievalEvaluator(data.queries, data.corpus, relevant, batch_size=64, mrr_at_k=[10],
                                              ndcg_at_k=[10], accuracy_at_k=[10], precision_recall_at_k=[10],
                                              map_at_k=[100], write_csv=False)
    theirs = evaluator(st_minilm)
    assert ours.metrics.n_scored == len(data.queries) and ours.metrics.n_dropped == 0
    for metric in ("ndcg@10", "mrr@10", "recall@10", "map@100"):
        assert abs(ours.metrics.summary[metric] - theirs[f"cosine_{metric}"]) <= 1e-3, metric
    assert 0.5 < ours.metrics.summary["ndcg@10"] < 0.95  # a real model on real data, not a degenerate case
    # the ranked lists are kept, best first, for per-query diagnostics
    hits = ours.ranking.ranked[next(iter(data.queries))]
    assert len(hits) == 100 and all(a[1] >= b[1] for a, b in zip(hits, hits[1:]))


@pytest.mark.shared_data
def test_sts_matches_sentence_transformers(minilm, st_minilm):
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    sts = load_sts(shared("stsb", "sts-dev.tsv"))
    assert len(sts.scores) == 1500
    ours = evaluate_sts(minilm, sts, batch_size=64, max_length=MAX_LENGTH)
    evaluator = EmbeddingSimilarityEvaluator(sts.sentence1, sts.sentence2, sts.scores, batch_size=64,
                                             similarity_fn_names=["cosine"], write_csv=False)
    theirs = evaluator(st_minilm)
    assert abs(ours["spearman"] - theirs["spearman_cosine"]) <= 1e-3
    assert abs(ours["pearson"] - theirs["pearson_cosine"]) <= 1e-3
    assert ours["spearman"] > 0.8


# ---- tiny random models and data --------------------------------------------------------------------------
def tiny_model_folder(folder: Path, minilm_dir, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random BERT with the bundled tokenizer, saved as a model folder."""
    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, pooling="mean",
                      hidden_dropout=0.0, attention_dropout=0.0)
    tok = Tokenizer.from_folder(minilm_dir, position_limit=cfg.max_tokens)
    return save(Encoder(cfg), tok, folder)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("models")
    return tiny_model_folder(root / "tiny-a", minilm_dir, 0), tiny_model_folder(root / "tiny-b", minilm_dir, 1)


@pytest.fixture
def tiny(tiny_dirs):
    return Embedder.load(str(tiny_dirs[0]), device="cpu")


WORDS = "cell gene protein cancer brain heart virus vaccine drug dose trial mouse blood sleep diet bone".split()


def toy_data() -> RetrievalData:
    corpus = {f"d{i}": f"{WORDS[i % 16]} {WORDS[(3 * i) % 16]} study {i} of {WORDS[(5 * i + 1) % 16]}"
              for i in range(40)}
    queries = {f"q{i}": f"what about {WORDS[i]} and {WORDS[(i + 7) % 16]}" for i in range(6)}
    qrels = {f"q{i}": {f"d{i}": 1, f"d{i + 10}": 2} for i in range(6)}
    return RetrievalData(queries, corpus, qrels, name="toy")


class EncodeSpy:
    """Counts the texts that reach Embedder.encode, separately for passages and queries."""

    def __init__(self, monkeypatch):
        self.passages = self.queries = 0
        real = Embedder.encode

        def encode(emb, texts, **kw):
            if kw.get("is_query"):
                self.queries += len(texts)
            else:
                self.passages += len(texts)
            return real(emb, texts, **kw)

        monkeypatch.setattr(Embedder, "encode", encode)


def test_cache_second_run_encodes_nothing_and_changes_invalidate(tiny, tmp_path, monkeypatch):
    spy = EncodeSpy(monkeypatch)
    data, cache = toy_data(), tmp_path / "cache"
    first = evaluate_retrieval(tiny, data, cache_dir=cache, ks=(1, 10))
    assert spy.passages == 40 and first.ranking.n_encoded == 40 and first.ranking.n_cached == 0
    assert first.ranking.cache_file.exists() and [p.name for p in cache.iterdir()] == [first.ranking.cache_file.name]

    spy.passages = 0
    second = evaluate_retrieval(tiny, data, cache_dir=cache, ks=(1, 10))
    assert spy.passages == 0 and second.ranking.n_encoded == 0 and second.ranking.n_cached == 40
    assert second.ranking.ranked == first.ranking.ranked and second.metrics.summary == first.metrics.summary
    assert spy.queries == 12  # queries are always encoded: they are few, and their instruction may change

    def encoded(embedder, corpus, **kw) -> int:
        spy.passages = 0
        result = encode_corpus(embedder, corpus, cache_dir=cache, **kw)
        assert result.n_encoded == spy.passages
        return spy.passages

    changed = dict(data.corpus, d3="a different passage")
    assert encoded(tiny, changed) == 40 and encoded(tiny, changed) == 0
    assert encoded(tiny, data.corpus, max_length=16) == 40 and encoded(tiny, data.corpus, max_length=16) == 0
    with torch.no_grad():
        tiny.model.layers[1].ffn_out.weight[0, 0] += 1e-3  # a changed model: another fingerprint
    assert encoded(tiny, data.corpus) == 40 and encoded(tiny, data.corpus) == 0
    assert len(list(cache.glob("*.safetensors"))) == 4 and not list(cache.glob("*.tmp"))

    # a damaged cache file is encoded again and rewritten, not an error
    path = first.ranking.cache_file
    path.write_bytes(path.read_bytes()[:100])
    with torch.no_grad():
        tiny.model.layers[1].ffn_out.weight[0, 0] -= 1e-3
    assert encoded(tiny, data.corpus) == 40 and encoded(tiny, data.corpus) == 0


def test_memory_cache_keeps_the_first_model_and_the_latest_and_writes_only_when_asked(tiny, tmp_path, monkeypatch):
    # a training run validates (memory only) and then tests (disk too): the base model validated first stays, the
    # `keep` latest others stay, and a test view writes a remembered model's embeddings to disk without encoding
    spy = EncodeSpy(monkeypatch)
    corpus = toy_data().corpus
    cache = CorpusCache(tmp_path / "cache", keep=1)
    val, test = cache.view(write=False), cache

    def encoded(view) -> int:
        spy.passages = 0
        encode_corpus(tiny, corpus, cache_dir=view)
        return spy.passages

    assert encoded(val) == 40 and encoded(val) == 0 and not (tmp_path / "cache").exists()  # base: memory only
    w = tiny.model.layers[1].ffn_out.weight
    steps = [w.detach().clone()] + [w.detach() + k for k in (1.0, 2.0)]  # base, step 1, step 2

    def at(k: int):
        with torch.no_grad():
            w.copy_(steps[k])
        return val

    assert encoded(at(1)) == 40
    assert encoded(at(2)) == 40 and encoded(test) == 0  # step 2 evicts step 1 (keep=1), never the base
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # the test wrote what it found in memory
    assert encoded(at(1)) == 40  # step 1 was evicted
    assert encoded(at(0)) == 0  # the base model is pinned
    # a corpus bigger than the memory budget is not held
    small = CorpusCache(None, max_bytes=100)
    assert encoded(small) == 40 and encoded(small) == 40 and small.memory == {}


def test_dropout_rates_leave_the_fingerprint_alone_and_the_rest_of_the_config_does_not(tiny):
    """The base model set up for fine-tuning with other dropout rates (--attention-dropout 0) embeds exactly as it
    did, so its cached encodings and mined negatives must still be found; a setting that changes embeddings must
    not be."""
    cfg = tiny.model.cfg
    kept = (cfg.hidden_dropout, cfg.attention_dropout, cfg.pooling)
    before, texts = tiny.fingerprint(), ["a claim about cells", "another passage"]
    embedded = tiny.encode(texts)
    try:
        tiny.model.set_dropout(0.2, 0.3)
        assert (cfg.hidden_dropout, cfg.attention_dropout) == (0.2, 0.3) != kept[:2]
        assert tiny.fingerprint() == before and (tiny.encode(texts) == embedded).all()
        cfg.pooling = "mean" if kept[2] == "cls" else "cls"
        assert tiny.fingerprint() != before
    finally:
        tiny.model.set_dropout(*kept[:2])  # the modules' rates too, for the module's later tests
        cfg.pooling = kept[2]


def test_without_cache_dir_nothing_is_fingerprinted(tiny, monkeypatch):
    monkeypatch.setattr(Embedder, "fingerprint", lambda self: pytest.fail("fingerprinted without a cache"))
    result = evaluate_retrieval(tiny, toy_data(), ks=(5,))
    assert result.ranking.n_encoded == 40 and result.ranking.cache_file is None


def test_query_prompt_reaches_queries_only(tiny, monkeypatch):
    """Observe the exact strings the tokenizer sees."""
    seen: list[str] = []
    tok = tiny.tokenizer

    class Spy:
        def __init__(self, tk):
            self.tk = tk

        def encode_batch(self, texts):
            seen.extend(texts)
            return self.tk.encode_batch(texts)

    length = tok.max_length
    tok._truncating[length] = Spy(tok._with_truncation(length))
    data = toy_data()
    data.prompts = {"q0": "LINE: ", "q1": ""}  # per-line instructions, as a training JSONL gives them
    tok.query_prompt = "MODEL: "

    def run(**kw) -> tuple[set[str], set[str]]:
        seen.clear()
        search(tiny, data, k=5, **kw)
        queries = {s for s in seen if s.endswith(tuple(data.queries.values()))}
        return queries, set(seen) - queries

    queries, passages = run()
    assert passages == set(data.corpus.values())  # no instruction on any passage
    assert queries == {"LINE: " + data.queries["q0"], data.queries["q1"],
                       *("MODEL: " + data.queries[f"q{i}"] for i in range(2, 6))}
    queries, passages = run(query_prompt="GIVEN: ")  # overrides the model's, not the per-line ones
    assert passages == set(data.corpus.values())
    assert queries == {"LINE: " + data.queries["q0"], data.queries["q1"],
                       *("GIVEN: " + data.queries[f"q{i}"] for i in range(2, 6))}
    data.prompts = {}
    queries, _ = run(query_prompt="")
    assert queries == set(data.queries.values())


def test_passage_prompt_reaches_every_passage_and_keys_the_cache(tiny, tmp_path):
    """encode_corpus embeds the passages with the model's passage instruction; the cache never hands back what another
    instruction made, and without one the key is the one cached files had before passage instructions existed."""
    corpus, cache = toy_data().corpus, tmp_path / "cache"
    ids, texts = list(corpus), list(corpus.values())
    bare = encode_corpus(tiny, corpus, cache_dir=cache)
    old = {"format": CACHE_FORMAT, "model": tiny.fingerprint(), "max_length": effective_max_length(tiny, None),
           "precision": encode_precision(tiny, False), "corpus": corpus_hash(ids, texts)}
    assert bare.cache_file.stem == hashlib.blake2b(json.dumps(old, sort_keys=True).encode(), digest_size=16).hexdigest()
    tiny.tokenizer.passage_prompt = "passage: "
    first = encode_corpus(tiny, corpus, cache_dir=cache)
    assert first.n_encoded == 40 and (first.emb - bare.emb).abs().max() > 1e-3
    assert torch.allclose(first.emb, torch.from_numpy(tiny.encode(["passage: " + t for t in texts])), atol=1e-6)
    tiny.tokenizer.passage_prompt = "search_document: "
    other = encode_corpus(tiny, corpus, cache_dir=cache)
    assert other.n_encoded == 40 and (other.emb - first.emb).abs().max() > 1e-3
    tiny.tokenizer.passage_prompt = "passage: "
    again = encode_corpus(tiny, corpus, cache_dir=cache)
    assert again.n_cached == 40 and torch.equal(again.emb, first.emb)
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_per_line_prompts_from_a_training_file(tiny, monkeypatch):
    data = load_eval_data(FIXTURES / "flagembedding" / "only_1neg.jsonl")
    assert isinstance(data, RetrievalData) and data.prompts
    prompts = []
    real = Embedder.encode

    def encode(emb, texts, **kw):
        if kw.get("is_query"):
            prompts.append(kw.get("prompt"))
        return real(emb, texts, **kw)

    monkeypatch.setattr(Embedder, "encode", encode)
    search(tiny, data, k=3)
    assert set(prompts) == set(data.prompts.values())


def test_ignore_identical_ids(tiny):
    data = toy_data()
    for i in range(6):  # each query's text is also a document under the query's own id: it ranks first
        data.corpus[f"q{i}"] = data.queries[f"q{i}"]
    kept = evaluate_retrieval(tiny, data, ks=(1, 6))
    assert all(kept.ranking.ranked[q][0][0] == q for q in data.queries)
    skipped = evaluate_retrieval(tiny, data, ks=(1, 5), ignore_identical_ids=True)
    for q in data.queries:
        hits = [d for d, _ in skipped.ranking.ranked[q]]
        assert q not in hits and len(hits) == 5
        assert hits == [d for d, _ in kept.ranking.ranked[q] if d != q][:5]


def test_queries_without_relevant_documents_are_dropped(tiny):
    data = toy_data()
    data.qrels["q5"] = {"d5": 0}
    result = evaluate_retrieval(tiny, data, ks=(10,))
    assert result.metrics.n_scored == 5 and result.metrics.n_dropped == 1
    data.qrels = {"q5": {"d5": 0}}
    with pytest.raises(UserError, match="no query has a relevant document"):
        evaluate_retrieval(tiny, data)


# ---- detecting and reading the data ---------------------------------------------------------------------
def write_beir(folder: Path, corpus: list[str] | None = None, qrels: list[str] | None = None, split: str = "test"):
    folder.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = [json.dumps({"_id": f"d{i}", "title": f"Title {i}", "text": f"{WORDS[i]} {WORDS[(i + 5) % 16]}"})
                  for i in range(16)]
    (folder / "corpus.jsonl").write_text("".join(line + "\n" for line in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"about {WORDS[i]}"}) + "\n"
                                                  for i in range(4)))
    (folder / "qrels").mkdir(exist_ok=True)
    if qrels is None:
        qrels = [f"q{i}\td{i}\t1" for i in range(4)] + ["q3\td9\t0"]
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(q + "\n" for q in qrels))
    return folder


def test_load_eval_data_detects_the_format(tmp_path):
    beir = load_eval_data(write_beir(tmp_path / "beir"), "test")
    assert isinstance(beir, RetrievalData) and beir.corpus["d1"] == f"Title 1 {WORDS[1]} {WORDS[6]}"
    assert load_eval_data(tmp_path / "beir", "test", use_title=False).corpus["d1"] == f"{WORDS[1]} {WORDS[6]}"
    with pytest.raises(UserError, match="no split 'dev'.*it has test"):
        load_eval_data(tmp_path / "beir", "dev")
    sts = load_eval_data(FIXTURES / "sts.tsv")
    assert isinstance(sts, STSData) and len(sts.scores) == 20
    (tmp_path / "sts.jsonl").write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n'
                                        '{"sentence1": "c", "sentence2": "d", "score": 2.5}\n')
    assert load_eval_data(tmp_path / "sts.jsonl").scores == [1.0, 2.5]
    train = load_eval_data(FIXTURES / "flagembedding" / "symmetric_sts.jsonl")  # training format, STS content
    assert isinstance(train, RetrievalData) and len(train.queries) == 10
    assert all(len(r) >= 1 for r in train.qrels.values())
    assert all(d in train.corpus for r in train.qrels.values() for d in r)
    (tmp_path / "other.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(UserError, match="other.jsonl:1: neither a training line"):
        load_eval_data(tmp_path / "other.jsonl")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match="bad.jsonl:1: invalid JSON"):
        load_eval_data(tmp_path / "bad.jsonl")


# ---- the CLI ------------------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_cli_two_models_one_table_and_json(tiny_dirs, tmp_path):
    data, out, cache = write_beir(tmp_path / "toy"), tmp_path / "out.json", tmp_path / "cache"
    a, b = tiny_dirs
    r = run_cli("--model", a, "--model", b, "--data", data, "--cache-dir", cache, "--out", out,
                "--ks", "1,3,10", "--query-prompt", "Q: ")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if "tiny-" in line]
    assert len(rows) == 2 and "tiny-a" in rows[0] and "tiny-b" in rows[1]
    assert "nDCG@10" in r.stdout and "MRR@10" in r.stdout and "4 queries scored, 0 dropped" in r.stdout
    results = json.loads(out.read_text())
    assert [m["model"] for m in results["models"]] == [str(a), str(b)]
    assert results["dataset"]["fingerprint"] == load_beir(data, "test").fingerprint()
    fingerprints = {m["fingerprint"] for m in results["models"]}
    assert len(fingerprints) == 2 and fingerprints == {Embedder.load(str(p)).fingerprint() for p in tiny_dirs}
    for m in results["models"]:
        assert {f"{k}@{c}" for k in ("ndcg", "mrr", "recall", "map", "precision") for c in (1, 3, 10)} == set(m["metrics"])
        assert m["n_encoded"] == 16 and m["query_prompt"] == "Q: " and m["n_scored"] == 4
    assert not malloc.glibc() or "malloc keeps freed memory" in r.stderr  # --malloc keep's default, said in the log
    # again: every passage comes from the cache
    r = run_cli("--model", a, "--data", data, "--cache-dir", cache, "--out", out)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["models"][0]["n_encoded"] == 0 and "cached" in r.stdout
    # unless the passages take an instruction: then they are encoded with it
    r = run_cli("--model", a, "--data", data, "--cache-dir", cache, "--out", out, "--passage-prompt", "P: ")
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["models"][0]
    assert row["n_encoded"] == 16 and row["passage_prompt"] == "P: "


def test_cli_sts(tiny_dirs, tmp_path):
    data, out = tmp_path / "sts.tsv", tmp_path / "sts.json"
    rows = [f"{i % 5}.0\t{WORDS[i]} and {WORDS[i // 2]}\t{WORDS[(i * 3) % 16]} then {WORDS[i]}" for i in range(16)]
    data.write_text("score\tsentence1\tsentence2\n" + "\n".join(rows) + "\n")
    r = run_cli("--model", tiny_dirs[0], "--model", tiny_dirs[1], "--data", data, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Spearman" in r.stdout and "Pearson" in r.stdout and "tiny-b" in r.stdout
    result = json.loads(out.read_text())
    assert result["dataset"]["n_pairs"] == 16 and result["dataset"]["fingerprint"] == load_sts(data).fingerprint()
    assert [set(m["metrics"]) for m in result["models"]] == [{"spearman", "pearson"}] * 2


def corpus_lines(edit) -> list[str]:
    lines = [json.dumps({"_id": f"d{i}", "title": "", "text": f"passage {WORDS[i]}"}) for i in range(16)]
    return edit(lines)


BAD_INPUTS = {
    "bad JSON line": (lambda root: write_beir(root, corpus=corpus_lines(lambda c: c[:1] + ['{"_id": "d1",'] + c[2:])),
                      "corpus.jsonl:2: invalid JSON"),
    "missing _id": (lambda root: write_beir(root, corpus=corpus_lines(lambda c: c[:2] + ['{"text": "no id"}'] + c[3:])),
                    "corpus.jsonl:3: missing field '_id'"),
    "unknown query id": (lambda root: write_beir(root, qrels=["q0\td0\t1", "q9\td1\t1"]),
                         "test.tsv:3: query-id 'q9' is not in queries.jsonl"),
    "empty corpus": (lambda root: write_beir(root, corpus=[]), "corpus.jsonl: the corpus is empty"),
    "non-numeric STS score": (lambda root: (root.mkdir(), (root / "sts.tsv").write_text(
        "score\tsentence1\tsentence2\n1.0\ta\tb\nhigh\tc\td\n"), root / "sts.tsv")[-1],
        "sts.tsv:3: field 'score' is not a number: 'high'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_error_line(case, tiny_dirs, tmp_path):
    make, message = BAD_INPUTS[case]
    path = make(tmp_path / "data")
    r = run_cli("--model", tiny_dirs[0], "--data", path, "--out", tmp_path / "out.json")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "out.json").exists()


def test_cli_missing_model_is_one_error_line(tmp_path):
    r = run_cli("--model", tmp_path / "nope", "--data", write_beir(tmp_path / "toy"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model") and "nope" in lines[0]


# ---- truncated (Matryoshka) embeddings ----------------------------------------------------------------------
def test_truncated_dims_equal_a_naive_ranking_and_correlation(tiny):
    import torch.nn.functional as F

    from bge.metrics import retrieval_metrics, sts_correlations
    data = toy_data()
    ev = evaluate_retrieval(tiny, data, ks=(1, 3, 10), dims=[32, 16, 8])  # 32 is the full size: not repeated
    assert set(ev.by_dim) == {16, 8}
    docs = list(data.corpus)
    c = torch.from_numpy(tiny.encode([data.corpus[d] for d in docs]))
    q = torch.from_numpy(tiny.encode(list(data.queries.values()), is_query=True))
    for d, result in ev.by_dim.items():
        scores = F.normalize(q[:, :d], dim=1) @ F.normalize(c[:, :d], dim=1).T
        ranked = {qid: [docs[j] for j in row.argsort(descending=True, stable=True)[:10].tolist()]
                  for qid, row in zip(data.queries, scores)}
        naive = retrieval_metrics(data.qrels, ranked, (1, 3, 10)).summary
        assert result.summary == pytest.approx(naive, abs=1e-12)
    assert ev.by_dim[8].summary != ev.metrics.summary
    sts = STSData([f"{WORDS[i]} cell" for i in range(12)], [f"{WORDS[(i * 5) % 16]} gene" for i in range(12)],
                  [float(i % 4) for i in range(12)])
    out = evaluate_sts(tiny, sts, dims=[8])
    a = F.normalize(torch.from_numpy(tiny.encode(sts.sentence1))[:, :8], dim=1)
    b = F.normalize(torch.from_numpy(tiny.encode(sts.sentence2))[:, :8], dim=1)
    assert out["by_dim"][8] == pytest.approx(sts_correlations((a * b).sum(1).numpy(), sts.scores), abs=1e-6)
    with pytest.raises(UserError, match="--dims 64"):
        evaluate_sts(tiny, sts, dims=[64])


def test_cli_dims_adds_a_row_per_size(tiny_dirs, tmp_path):
    data, out = write_beir(tmp_path / "toy"), tmp_path / "out.json"
    r = run_cli("--model", tiny_dirs[0], "--data", data, "--dims", "16,8", "--no-cache", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "tiny-a @16" in r.stdout and "tiny-a @8" in r.stdout
    rows = json.loads(out.read_text())["models"]
    assert [m["dim"] for m in rows] == [32, 16, 8] and rows[1]["metrics"] != rows[0]["metrics"]
    r = run_cli("--model", tiny_dirs[0], "--data", data, "--dims", "64", "--no-cache", "--out", out)
    assert r.returncode == 2 and "--dims 64" in r.stderr and "Traceback" not in r.stderr


def test_cli_merges_lines_that_share_a_query_and_says_so(tiny_dirs, tmp_path):
    lines = [{"query": f"question {i // 2}", "pos": [f"answer {i}"], "neg": [f"other {i}"]} for i in range(8)]
    data, out = tmp_path / "pairs.jsonl", tmp_path / "out.json"
    data.write_text("".join(json.dumps(l) + "\n" for l in lines))
    split = tmp_path / "split.json"  # ids of merged lines name their query
    split.write_text(json.dumps({"format": 2, "tasks": {"retrieval": {"train": [], "val": [], "test": ["2"]}}}))
    r = run_cli("--model", tiny_dirs[0], "--data", data, "--no-cache", "--out", out, "--queries", split)
    assert r.returncode == 0, r.stderr
    assert "1 line(s) repeat an earlier line's query" in " ".join(r.stderr.split())
    result = json.loads(out.read_text())["dataset"]
    assert result["n_queries"] == 1 and result["n_merged_lines"] == 1
