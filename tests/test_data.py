"""Reading training files: every kind of bad line gets its own clear message; odd but valid files load."""
import json
from pathlib import Path

import pytest

from bge.data import DataError, load_examples, load_training_file, retrieval_from_examples
from bge.errors import UserError
from conftest import FIXTURES, SHARED_DATA

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


@pytest.mark.shared_data
def test_real_flagembedding_samples_load(tmp_path):
    files = sorted((SHARED_DATA / "flagembedding_examples").glob("*.jsonl"))
    assert len(files) >= 4
    for f in files:
        examples, skipped = load_examples(f)
        assert examples and not skipped


def test_flagembedding_shaped_fixtures_load():
    """The fixtures in FlagEmbedding's shapes: prompts, types, teacher scores."""
    files = sorted((FIXTURES / "flagembedding").glob("*.jsonl"))
    assert [f.stem for f in files] == ["normal", "only_1neg", "plain", "symmetric_sts"]
    for f in files:
        examples, skipped = load_examples(f)
        assert len(examples) == 10 and not skipped
        assert {ex.kind for ex in examples} == {"" if f.stem == "plain" else f.stem}
    scored, _ = load_examples(FIXTURES / "flagembedding" / "only_1neg.jsonl")
    assert all(len(ex.neg) == len(ex.neg_scores) == 1 and ex.prompt for ex in scored)


def test_retrieval_set_from_examples_dedups_passages_by_text():
    from bge.data import Example
    data = retrieval_from_examples([Example("q1", ["a", "b"], ["c"], qid="1"), Example("q2", ["c"], ["a"], qid="2")])
    assert len(data.corpus) == 3 and data.queries == {"1": "q1", "2": "q2"}
    docs = {t: d for d, t in data.corpus.items()}
    assert data.qrels == {"1": {docs["a"]: 1, docs["b"]: 1}, "2": {docs["c"]: 1}}


# ---- STS pairs, classification rows, mixed files --------------------------------------------------------------
PAIR = {"sentence1": "a cat sits", "sentence2": "a cat is sitting", "score": 4.5}
ROW = {"text": "my battery will not charge", "label": "ebike_battery"}


@pytest.mark.parametrize("line,message", [
    ('{"sentence1": "a", "sentence2": "b"}', "missing field 'score'"),
    ('{"sentence1": "a", "sentence2": "b", "score": "high"}', "field 'score' is not a number: 'high'"),
    ('{"sentence1": "a", "sentence2": "b", "score": true}', "field 'score' is not a number: True"),
    ('{"sentence1": "a", "sentence2": "b", "score": NaN}', "field 'score' is not a number: nan"),
    ('{"sentence1": "a", "score": 1}', "missing field 'sentence2'"),
    ('{"text": "t"}', "missing field 'label'"),
    ('{"text": "t", "label": ""}', "field 'label' is empty"),
    ('{"text": "t", "label": [1]}', "field 'label' must be a string or an integer, got list"),
    ('{"label": "x"}', "missing field 'text'"),
    ('{"text": "t", "label": "x", "type": "clasification"}', "field 'type' must be one of retrieval, sts"),
    ('{"query": "q", "pos": ["p"], "type": "sts"}', "sts lines need the fields score, sentence1, sentence2; this one has "
                                                   "pos, query, type"),
])
def test_each_bad_sts_or_classification_line_has_a_one_line_message(tmp_path, line, message):
    path = write(tmp_path, [json.dumps(PAIR), json.dumps(ROW), line])
    with pytest.raises(DataError) as e:
        load_training_file(path)
    assert str(e.value).startswith(f"{path}:3: {message}"), str(e.value)


def test_mixed_file_by_fields_and_type_with_line_numbers(tmp_path):
    lines = [json.dumps(GOOD), json.dumps(PAIR), json.dumps(ROW), json.dumps({"text": "x", "label": 3}),
             json.dumps({**GOOD, "type": "symmetric_sts"}), json.dumps({**PAIR, "type": "regression"}),
             json.dumps({**ROW, "type": "classification"}), json.dumps({**GOOD, "type": "normal"})]
    data, skipped = load_training_file(write(tmp_path, lines))
    assert not skipped and list(data.by_task()) == ["retrieval", "sts", "classification"]
    assert [ex.line for ex in data.retrieval] == [1, 5, 8] and [ex.qid for ex in data.retrieval] == ["1", "5", "8"]
    assert [(p.line, p.score) for p in data.sts] == [(2, 4.5), (6, 4.5)]
    assert [(r.line, r.label) for r in data.classification] == [(3, "ebike_battery"), (4, "3"), (7, "ebike_battery")]


def test_task_flag_reads_lines_without_a_type_as_that_task(tmp_path):
    path = write(tmp_path, [json.dumps(ROW), json.dumps({**PAIR, "type": "sts"})])
    data, _ = load_training_file(path, task="classification")
    assert len(data.classification) == 1 and len(data.sts) == 1  # a line's own type wins
    with pytest.raises(DataError, match=":1: sts lines need the fields score, sentence1, sentence2; this one has label"):
        load_training_file(path, task="sts")
    with pytest.raises(UserError, match="cannot be read as --task classification"):
        load_training_file(FIXTURES / "sts.tsv", task="classification")


def test_skip_bad_lines_across_tasks(tmp_path):
    path = write(tmp_path, [json.dumps(PAIR), '{"text": "t"}', json.dumps(ROW), "{oops"])
    data, skipped = load_training_file(path, skip_bad_lines=True)
    assert len(data.sts) == 1 and len(data.classification) == 1 and len(skipped) == 2


def test_sts_tsv_as_a_training_file():
    data, _ = load_training_file(FIXTURES / "sts.tsv")
    assert list(data.by_task()) == ["sts"] and len(data.sts) == 20
    assert data.sts[0].line == 2 and data.sts[0].score == 4.2 and data.sts[-1].line == 21


@pytest.mark.shared_data
def test_real_sts_tsv_and_flagembedding_samples_as_training_files():
    data, _ = load_training_file(SHARED_DATA / "stsb" / "sts-train.tsv")
    assert list(data.by_task()) == ["sts"] and len(data.sts) == 5749
    assert data.sts[0].line == 2 and 0 <= min(p.score for p in data.sts) and max(p.score for p in data.sts) <= 5
    for f in sorted((SHARED_DATA / "flagembedding_examples").glob("*.jsonl")):
        # every FlagEmbedding type comes on query/pos/neg lines, trained contrastively as FlagEmbedding does
        data, skipped = load_training_file(f)
        assert list(data.by_task()) == ["retrieval"] and len(data.retrieval) == 10 and not skipped
        assert [(ex.query, ex.pos) for ex in data.retrieval] == [(ex.query, ex.pos) for ex in load_examples(f)[0]]


def test_bundled_classification_example():
    data, _ = load_training_file(Path(__file__).resolve().parents[1] / "examples" / "bike_tickets.jsonl")
    rows = data.classification
    assert list(data.by_task()) == ["classification"] and len(rows) == 240
    assert {r.label: sum(x.label == r.label for x in rows) for r in rows} == {
        "repair_booking": 40, "warranty_claim": 40, "order_status": 40, "fit_sizing": 40, "ebike_battery": 40,
        "return_refund": 40}
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


def test_retrieval_only_readers_name_a_line_of_another_task(tmp_path):
    # mining, scoring and retrieval evaluation read query/pos lines only: a typed STS line is named, not misparsed
    sts = {"type": "sts", "sentence1": "a", "sentence2": "b", "score": 3}
    path = write(tmp_path, [json.dumps(GOOD), json.dumps(sts)])
    with pytest.raises(UserError, match=r"train.jsonl:2: this needs query/pos lines, and this line is an STS line"):
        load_examples(path)
    with pytest.raises(DataError, match=r":2: field 'type' must be one of"):
        load_examples(write(tmp_path, [json.dumps(GOOD), json.dumps({**GOOD, "type": "banana"})], "typo.jsonl"))


def test_lines_sharing_a_query_are_one_evaluation_query_with_all_their_positives(tmp_path):
    """One line per (query, positive), as FlagEmbedding files often have: scored apart, each line's query would count
    the other lines' positives as non-relevant."""
    from bge.data import load_eval_data
    lines = [{"query": "How do I fix a flat?", "pos": ["patch the tube"], "neg": ["oil the chain"]},
             {"query": "how do i  fix a FLAT?", "pos": ["replace the tube"]},
             {"query": "How do I fix a flat?", "pos": ["patch the tube"], "prompt": "Find: "},  # another instruction
             {"query": "why do my brakes squeal", "pos": ["clean the rotor"]},
             {"query": "How do I fix a flat? ", "pos": ["use a tyre lever", "patch the tube"]}]
    data = load_eval_data(write(tmp_path, [json.dumps(l) for l in lines], "pairs.jsonl"))
    docs = {t: d for d, t in data.corpus.items()}
    assert list(data.queries) == ["1", "3", "4"] and data.merged == {"1": ["2", "5"]} and data.n_merged == 2
    assert data.qrels["1"] == {docs[t]: 1 for t in ("patch the tube", "replace the tube", "use a tyre lever")}
    assert data.qrels["3"] == {docs["patch the tube"]: 1} and data.prompts == {"3": "Find: "}
    assert data.subset(["1", "4"]).merged == {"1": ["2", "5"]} and data.subset(["4"]).n_merged == 0
    assert "2 line(s) repeat an earlier line's query" in data.merged_note("test")
    # lines that name their query (BEIR ids, as bge.mine writes them) stay apart, as the benchmark scores them
    named = [dict(l, qid=f"beir-{i}") for i, l in enumerate(lines)]
    data = load_eval_data(write(tmp_path, [json.dumps(l) for l in named], "named.jsonl"))
    assert len(data.queries) == 5 and data.n_merged == 0
