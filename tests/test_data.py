"""Reading training files: every kind of bad line gets its own clear message; odd but valid files load."""
import json

import pytest

from bge.data import DataError, load_examples, retrieval_from_examples

GOOD = {"query": "q", "pos": ["p"], "neg": ["n1", "n2"]}


def write(tmp_path, lines, name="train.jsonl", raw: bytes | None = None):
    path = tmp_path / name
    path.write_bytes(raw if raw is not None else "\n".join(lines).encode())
    return path


@pytest.mark.parametrize("line,message", [
    ('{"query": "q", "pos": ["p"]', "invalid JSON"),
    ('["q", "p"]', "expected a JSON object, got list"),
    ('{"pos": ["p"]}', "missing field 'query'"),
    ('{"query": "q"}', "missing field 'pos'"),
    ('{"query": "  ", "pos": ["p"]}', "field 'query' is empty"),
    ('{"query": 7, "pos": ["p"]}', "field 'query' must be a string, got int"),
    ('{"query": "q", "pos": []}', "field 'pos' is empty"),
    ('{"query": "q", "pos": ["p", ""]}', "field 'pos'[1] is empty"),
    ('{"query": "q", "pos": ["p", 3]}', "field 'pos'[1] must be a string, got int"),
    ('{"query": "q", "pos": {"a": 1}}', "field 'pos' must be a list of strings, got dict"),
    ('{"query": "q", "pos": ["p"], "neg": [null]}', "field 'neg'[0] must be a string, got NoneType"),
    ('{"query": "q", "pos": ["p"], "pos_scores": [1, 2]}', "field 'pos_scores' has 2 scores for 1 passages"),
    ('{"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": ["x"]}', "field 'neg_scores' must be a list of numbers"),
    ('{"query": "q", "pos": ["p"], "prompt": 3}', "field 'prompt' must be a string, got int"),
])
def test_each_bad_line_has_a_one_line_message(tmp_path, line, message):
    path = write(tmp_path, [json.dumps(GOOD), line])
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert str(e.value).startswith(f"{path}:2: {message}")
    assert "\n" not in str(e.value)


def test_every_bad_line_is_reported_and_skip_drops_them(tmp_path):
    lines = [json.dumps(GOOD), "{oops", json.dumps({"query": "q"}), json.dumps(GOOD), "[]"]
    path = write(tmp_path, lines)
    with pytest.raises(DataError) as e:
        load_examples(path)
    assert len(e.value.problems) == 3
    report = str(e.value).splitlines()
    assert report[0] == f"{path}: 3 bad lines (fix them, or pass --skip-bad-lines to drop them)"
    assert [r.split(":")[1] for r in report[1:]] == ["2", "3", "5"]
    examples, skipped = load_examples(path, skip_bad_lines=True)
    assert len(examples) == 2 and len(skipped) == 3 and [ex.line for ex in examples] == [1, 4]


def test_invalid_utf8_is_reported_with_its_line(tmp_path):
    path = write(tmp_path, [], raw=json.dumps(GOOD).encode() + b"\n" + b'{"query": "\xff", "pos": ["p"]}\n')
    with pytest.raises(DataError, match=":2: not valid UTF-8"):
        load_examples(path)


def test_bom_crlf_blank_lines_string_pos_and_triplets(tmp_path):
    rows = [{"query": "q1", "pos": "one passage, not a list of characters"},
            {"anchor": "q2", "positive": "p2", "negative": "n2"},
            {"query": "q3", "pos": ["p3"], "neg": [], "prompt": "Find: ", "pos_scores": [0.9], "extra": 1}]
    raw = b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in rows[:2]) + b"\r\n\r\n" + json.dumps(rows[2]).encode() + b"\r\n"
    examples, _ = load_examples(write(tmp_path, [], raw=raw))
    assert [ex.pos for ex in examples] == [["one passage, not a list of characters"], ["p2"], ["p3"]]
    assert examples[1].query == "q2" and examples[1].neg == ["n2"]
    assert examples[2].prompt == "Find: " and examples[2].pos_scores == [0.9] and examples[2].line == 4


def test_real_flagembedding_samples_load(tmp_path):
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / "shared" / "data" / "flagembedding_examples"
    files = sorted(folder.glob("*.jsonl"))
    assert len(files) >= 4
    for f in files:
        examples, skipped = load_examples(f)
        assert examples and not skipped


def test_retrieval_set_from_examples_dedups_passages_by_text():
    from bge.data import Example
    data = retrieval_from_examples([Example("q1", ["a", "b"], ["c"], qid="1"), Example("q2", ["c"], ["a"], qid="2")])
    assert len(data.corpus) == 3 and data.queries == {"1": "q1", "2": "q2"}
    docs = {t: d for d, t in data.corpus.items()}
    assert data.qrels == {"1": {docs["a"]: 1, docs["b"]: 1}, "2": {docs["c"]: 1}}


def test_qid_field_names_the_query_and_must_be_unique(tmp_path):
    rows = [{"query": "q1", "pos": ["p"], "qid": "beir-7"}, {"query": "q2", "pos": ["p"]}, {"query": "q3", "pos": ["p"], "qid": 12}]
    examples, _ = load_examples(write(tmp_path, [json.dumps(r) for r in rows]))
    assert [ex.qid for ex in examples] == ["beir-7", "2", "12"]
    path = write(tmp_path, [json.dumps(r) for r in rows + [{"query": "q4", "pos": ["p"], "qid": "beir-7"}]], "dup.jsonl")
    with pytest.raises(DataError, match=r":4: qid 'beir-7' is already used on line 1"):
        load_examples(path)
    path = write(tmp_path, [json.dumps({"query": "q", "pos": ["p"], "qid": ["x"]})], "bad.jsonl")
    with pytest.raises(DataError, match=r":1: field 'qid' must be a non-empty string or an integer"):
        load_examples(path)


def test_load_corpus_reads_beir_and_plain_passage_files(tmp_path):
    from bge.data import load_corpus
    folder = tmp_path / "beir"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text('{"_id": "a", "title": "T", "text": "one"}\n{"_id": 5, "text": "two"}\n')
    assert load_corpus(folder) == {"a": "T one", "5": "two"} and load_corpus(folder, use_title=False)["a"] == "one"
    pool = write(tmp_path, ['{"text": "first"}', '', '{"text": "second", "id": "s"}'], "pool.jsonl")
    assert load_corpus(pool) == {"1": "first", "s": "second"}  # FlagEmbedding's candidate pool: {"text"} lines
    bad = write(tmp_path, ['{"text": "x", "id": "s"}', '{"text": "y", "id": "s"}', '{"id": "z"}'], "bad.jsonl")
    with pytest.raises(DataError) as e:
        load_corpus(bad)
    assert [p.split(": ", 1)[1] for p in e.value.problems] == ["id 's' appears twice", "missing field 'text'"]


def test_retrieval_set_over_a_given_corpus_keeps_its_ids_and_adds_missing_passages():
    from bge.data import Example
    corpus = {"x": "alpha", "d0": "beta", "y": "gamma"}
    data = retrieval_from_examples([Example("q1", ["beta"], ["gamma", "new"], qid="7")], corpus=corpus)
    assert list(data.corpus.items())[:3] == list(corpus.items()) and len(data.corpus) == 4
    added = next(d for d, t in data.corpus.items() if t == "new")
    assert added not in corpus and data.qrels == {"7": {"d0": 1}}
