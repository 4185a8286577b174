"""python -m bge.score: teacher cosines in FlagEmbedding's pos_scores/neg_scores, every other field kept."""
import json

import numpy as np
import pytest

from bge.data import load_examples
from bge.embedder import Embedder
from bge.errors import UserError
from bge.score import main
from conftest import squash

ROWS = [
    {"qid": "a", "query": "how tight is a stem bolt", "pos": ["5 Nm on most stems."], "neg": ["Tyres at 4 bar.", "Chains wear."],
     "mined": {"ranks": [11, 12]}},
    {"anchor": "tubeless sealant life", "positive": "Sealant dries out in months.", "negative": "5 Nm on most stems."},
    {"query": "bleeding brakes", "pos": ["Open the bleed port.", "Use mineral oil."], "neg": [], "prompt": "Q: ",
     "pos_scores": [9.0, 9.0]},
]


def test_scores_are_the_teachers_cosines_and_other_fields_stay(minilm_dir, tmp_path, capsys):
    data, out = tmp_path / "train.jsonl", tmp_path / "scored.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    main(["--teacher", str(minilm_dir), "--data", str(data), "--out", str(out), "--no-cache"])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 3 and lines[0]["mined"] == {"ranks": [11, 12]} and lines[0]["qid"] == "a"
    assert lines[1]["anchor"] == ROWS[1]["anchor"] and lines[2]["prompt"] == "Q: "
    teacher = Embedder.load(str(minilm_dir), device="cpu")
    for ex, line in zip(load_examples(out)[0], lines):
        q = teacher.encode([ex.query], is_query=True)[0]  # the teacher's own instruction, never the line's prompt
        expected = teacher.encode(ex.pos + ex.neg) @ q
        assert np.allclose(line["pos_scores"] + line["neg_scores"], expected, atol=1e-5)
        assert len(ex.pos_scores) == len(ex.pos) and len(ex.neg_scores) == len(ex.neg)
    assert lines[0]["pos_scores"][0] > max(lines[0]["neg_scores"]) + 0.1  # a real teacher tells them apart
    assert lines[2]["pos_scores"] != [9.0, 9.0] and "3linesscored" in squash(capsys.readouterr().err)


def test_passage_prompt_reaches_the_teachers_passages(minilm_dir, tmp_path):
    data, out = tmp_path / "train.jsonl", tmp_path / "scored.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    main(["--teacher", str(minilm_dir), "--data", str(data), "--out", str(out), "--no-cache",
          "--passage-prompt", "passage: "])
    line = json.loads(out.read_text())
    teacher = Embedder.load(str(minilm_dir), device="cpu")
    q = teacher.encode([ROWS[0]["query"]], is_query=True)[0]
    expected = teacher.encode(["passage: " + t for t in ROWS[0]["pos"] + ROWS[0]["neg"]]) @ q
    assert np.allclose(line["pos_scores"] + line["neg_scores"], expected, atol=1e-5)


def test_bad_lines_fail_before_the_teacher_loads(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"query": "q"}\n')
    with pytest.raises(UserError, match=":1: missing field 'pos'"):
        main(["--teacher", str(tmp_path / "no-such-model"), "--data", str(data), "--out", str(tmp_path / "o.jsonl")])


def test_out_equal_to_data_is_refused(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    with pytest.raises(UserError, match="--out .* is the --data file"):
        main(["--teacher", "nowhere", "--data", str(data), "--out", str(tmp_path / "sub" / ".." / "train.jsonl")])
    assert json.loads(data.read_text()) == ROWS[0]
