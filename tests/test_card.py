"""Model cards (bge/card.py) in exported folders, and `python -m bge.push` against the session's fake hub."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard
from markdown_it import MarkdownIt

import train
from bge import card, push
from bge.embedder import Embedder
from bge.errors import UserError
from conftest import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "bike_repair.jsonl"


def html(markdown: str) -> str:
    return MarkdownIt("commonmark").enable("table").render(markdown)


@pytest.fixture(scope="module")
def run(tmp_path_factory, minilm_dir):
    """A finished run (1 epoch, merged/ at 0.5) whose base model came from the (fake) hub with an MIT card."""
    from conftest import HUB

    tmp = tmp_path_factory.mktemp("card")
    served = make_tiny_model(tmp / "served", minilm_dir)
    (served / "README.md").write_text("---\nlicense: mit\nlibrary_name: sentence-transformers\n---\n# tiny\n")
    data = tmp / "bikes.jsonl"
    data.write_text("".join(EXAMPLE.read_text().splitlines(keepends=True)[:60]))
    HUB.reset(served)
    try:
        train.main(["--data", str(data), "--model", "test-org/tiny-bert", "--out-dir", str(tmp), "--run-name", "r",
                    "--batch-size", "8", "--group-size", "2", "--max-passage-length", "48", "--max-query-length", "16",
                    "--lr", "1e-3", "--epochs", "1", "--merge-ratio", "0.5", "--explain", "0"])
    finally:
        HUB.reset(None)
    return tmp / "r", data


def test_best_card_loads_as_a_model_card_and_renders_the_test_table(run) -> None:
    run_dir, data = run
    loaded = ModelCard.load(run_dir / "best" / "README.md")
    assert loaded.data.base_model == "test-org/tiny-bert"
    assert loaded.data.license == "mit"  # from the base model's own card
    assert loaded.data.library_name == "sentence-transformers"
    assert loaded.data.pipeline_tag == "sentence-similarity"
    assert {"bge", "sentence-transformers", "retrieval"} <= set(loaded.data.tags)
    text = loaded.text
    assert f"`{data.name}` (sha256 `{hashlib.sha256(data.read_bytes()).hexdigest()}`)" in text
    assert "| retrieval | 42 | 9 | 9 |" in text
    assert (run_dir / "command.txt").read_text().strip() in text
    assert "InfoNCE on cosine scores at temperature 0.02, 2 passages per query" in text
    results = json.loads((run_dir / "results.json").read_text())
    rendered = html(text)
    for m in ("ndcg@10", "mrr@10", "recall@10", "recall@100"):
        b, t, mixed = results["base"][m], results["fine_tuned"][m], results["merged"][m]
        cells = [m, f"{b:.4f}", f"{t:.4f}", f"{t - b:+.4f}", f"{mixed:.4f}", f"{mixed - b:+.4f}"]
        assert "<tr>\n" + "".join(f"<td>{c}</td>\n" for c in cells) + "</tr>" in rendered
    assert f"best/ is the model of step {results['best_step']} of {results['steps']}" in text
    assert "had not finished" not in text


def test_merged_and_final_cards(run) -> None:
    run_dir, _ = run
    merged = (run_dir / "merged" / "README.md").read_text()
    assert "this folder is `merged/`" in merged and "| ndcg@10 |" in merged
    final = ModelCard.load(run_dir / "final" / "README.md")
    assert final.data.base_model == "test-org/tiny-bert"
    assert "| ndcg@10 |" not in final.text and "in the card of `best/`" in final.text


def test_a_card_written_before_the_end_says_so_and_a_run_without_test_set(tmp_path, tiny_model_dir) -> None:
    folder = tmp_path / "run" / "best"
    embedder = Embedder.load(str(tiny_model_dir), device="cpu")
    story = {"run": "run", "role": "best", "base": str(tiny_model_dir), "data": [], "splits": {"sts": {
        "train": 10, "validation": 2, "test": 0}}, "loss": ["sts: CoSENT, scale 20"], "settings": {"lr": 3e-5},
             "command": "", "config": {}}
    embedder.save(folder, run=story)
    assert "had not finished when this card was written" in (folder / "README.md").read_text()
    card.fill_results(tmp_path / "run", {"best_step": 3, "steps": 4, "best_val_spearman": 0.5})
    text = (folder / "README.md").read_text()
    assert "best/ is the model of step 3 of 4 (validation spearman 0.5000)" in text
    assert "no held-out test set" in text and "had not finished" not in text


@pytest.mark.parametrize("pooling, prompt, passage_prompt", [("cls", "Represent this sentence: ", ""),
                                                             ("mean", "", "passage: ")])
def test_usage_snippets_embed_as_bge_does(tmp_path, minilm_dir, pooling: str, prompt: str, passage_prompt: str) -> None:
    """The card's sentence-transformers and transformers snippets, run as written, give bge's embeddings."""
    base = make_tiny_model(tmp_path / "base", minilm_dir, pooling=pooling)
    embedder = Embedder.load(str(base), device="cpu", query_prompt=prompt, passage_prompt=passage_prompt)
    folder = embedder.save(tmp_path / "export")
    text = (folder / "README.md").read_text().replace(card.MODEL_ID, str(folder))
    said = ("Queries take the instruction `Represent this sentence: `; passages none." if prompt else
            "Queries take no instruction; passages `passage: `.")
    assert said in text
    blocks = dict(re.findall(r"### ([\w-]+)\n\n```python\n(.*?)```", text, re.S))
    assert set(blocks) == {"bge", "sentence-transformers", "transformers"}
    query, passage = "how do I stop my disc brakes squealing?", "Squealing discs are usually contaminated pads."
    expected = embedder.encode([query], is_query=True)
    expected_passage = embedder.encode([passage], is_passage=True)
    for lib in ("bge", "sentence-transformers"):
        scope: dict = {}
        exec(blocks[lib], scope)
        np.testing.assert_allclose(np.asarray(scope["q"]), expected, atol=1e-5)
        np.testing.assert_allclose(np.asarray(scope["d"]), expected_passage, atol=1e-5)
    scope = {}
    exec(blocks["transformers"], scope)
    np.testing.assert_allclose(scope["emb"].numpy(), expected, atol=1e-5)
    data = ModelCard.load(folder / "README.md").data
    assert data.base_model is None and data.license is None  # a local random model: nothing known


def test_standalone_save_of_the_bundled_model_names_its_hub_id_and_license(tmp_path) -> None:
    folder = Embedder.load("all-MiniLM-L6-v2", device="cpu").save(tmp_path / "copy")
    data = ModelCard.load(folder / "README.md").data
    assert (data.base_model, data.license) == ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0")
    assert "## Training run" not in (folder / "README.md").read_text()


def test_a_bilstm_card_says_only_bge_loads_it(tmp_path, tiny_model_dir) -> None:
    from bge.lstm import BiLSTMEncoder

    base = Embedder.load(str(tiny_model_dir), device="cpu")
    lstm = BiLSTMEncoder.from_encoder(base.model, hidden_size=8, num_layers=1, dim=0, dropout=0.0)
    folder = Embedder(lstm, base.tokenizer, name="bilstm", device="cpu").save(tmp_path / "lstm", base=str(tiny_model_dir))
    loaded = ModelCard.load(folder / "README.md")
    assert loaded.data.library_name is None and "sentence-transformers" not in loaded.data.tags
    assert "**only bge loads it**" in loaded.text and "SentenceTransformer(" not in loaded.text


def test_sha256_of_files_and_folders(tmp_path) -> None:
    f = tmp_path / "d" / "a.jsonl"
    f.parent.mkdir()
    f.write_bytes(b"x" * 3_000_000)
    assert card.sha256_of(f) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    listing = f"a.jsonl\t{card.sha256_of(f)}\n"
    assert card.sha256_of(tmp_path / "d") == hashlib.sha256(listing.encode()).hexdigest()
    f.write_bytes(b"y")  # a changed file is hashed again (size and mtime are the cache key)
    assert card.sha256_of(f) == hashlib.sha256(b"y").hexdigest()
    assert card.sha256_of(tmp_path / "gone") is None


def test_push_uploads_the_folder_in_one_commit(fake_hub, tmp_path, tiny_model_dir, monkeypatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret-token")
    folder = Embedder.load(str(tiny_model_dir), device="cpu").save(tmp_path / "best")
    (folder / ".DS_Store").write_bytes(b"junk")
    push.main([str(folder), "me/bike-repair", "--private", "--branch", "v1"])
    pushed = fake_hub.pushed["me/bike-repair"]
    assert pushed.private is True and pushed.branches == ["v1"]
    (commit,) = pushed.commits
    assert commit["revision"] == "v1"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name[0] != ".")
    assert sorted(commit["files"]) == files
    assert commit["files"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    readme = commit["files"]["README.md"].decode()
    assert 'SentenceTransformer("me/bike-repair")' in readme and card.MODEL_ID not in readme
    assert card.MODEL_ID in (folder / "README.md").read_text()  # the local card is left as it was
    assert all(r.headers.get("authorization") == "Bearer secret-token" for r in fake_hub.requests)
    assert "pushed 11 files" in capsys.readouterr().err


def test_push_refuses_a_folder_that_is_not_a_model(tmp_path) -> None:
    with pytest.raises(UserError, match="no model.safetensors; pass an exported model folder"):
        push.push(tmp_path, "me/x")
