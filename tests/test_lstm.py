"""The gated BiLSTM: padding never reaches a real token, padded equals packed equals one sequence alone, the
pooling against a naive reference, its own save format, and a tiny model that learns a 32-pair set."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bge import Embedder, UserError, load
from bge.loss import info_nce
from bge.lstm import (BiLSTMEncoder, LSTMConfig, attention_pool, max_pool, pca_project, recur_packed, recur_padded,
                      reverse_index)
from bge.model import Encoder, ModelConfig
from bge.tokenizer import Tokenizer

TEXTS = ["a short one", "a somewhat longer sentence about chains and gears and brakes",
         "mid length text here", "x"]


def tiny(seed: int = 0, dropout: float = 0.0, **kw) -> BiLSTMEncoder:
    torch.manual_seed(seed)
    cfg = LSTMConfig(embed_size=24, hidden_size=8, num_layers=2, dim=12, dropout=dropout, **kw)
    return BiLSTMEncoder(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def tok(minilm_dir):
    return Tokenizer.from_folder(minilm_dir, position_limit=512)


def batch(tok, texts=TEXTS):
    ids, mask = tok(texts)
    assert (mask == 0).any() and ids.shape[1] % 8 == 0  # really padded
    return ids, mask


def bidirectional_reference(layer, x_one: torch.Tensor) -> torch.Tensor:
    """torch's own bidirectional LSTM, with the layer's two directions' weights, on one unpadded sequence."""
    ref = torch.nn.LSTM(layer.fwd.input_size, layer.fwd.hidden_size, batch_first=True, bidirectional=True)
    with torch.no_grad():
        for name, p in layer.fwd.named_parameters():
            getattr(ref, name).copy_(p)
            getattr(ref, name + "_reverse").copy_(getattr(layer.bwd, name))
    return ref(x_one[None])[0][0]


def test_both_layouts_equal_torch_bidirectional_lstm_on_each_sequence_alone(tok):
    ids, mask = batch(tok)
    x = torch.randn(*ids.shape, 16)
    layer = BiLSTMEncoder(LSTMConfig(embed_size=16, hidden_size=8, dim=4)).layers[0]
    lengths = mask.sum(1).tolist()
    with torch.no_grad():
        padded = recur_padded(layer.fwd, layer.bwd, x, reverse_index(mask))
        packed = recur_packed(layer.fwd, layer.bwd, x[mask.bool()], lengths)
        alone = torch.cat([bidirectional_reference(layer, x[i, :n]) for i, n in enumerate(lengths)])
    assert torch.allclose(padded[mask.bool()], alone, atol=1e-6)
    assert torch.allclose(packed, alone, atol=1e-6)


def test_reverse_index_reverses_within_each_length_and_is_its_own_inverse():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    rev = reverse_index(mask)
    assert rev.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
    assert torch.equal(rev.gather(1, rev), torch.arange(5).expand(3, 5))


def test_padded_and_packed_model_outputs_agree_for_real_tokens(tok):
    model = tiny().eval()
    ids, mask = batch(tok)
    with torch.no_grad():
        padded = model(ids, mask)
        packed = model.forward_packed(ids, mask)
        assert torch.allclose(padded[mask.bool()], packed, atol=1e-5)
        assert torch.allclose(model.embed(ids, mask), model.embed(ids, mask, packed=True), atol=1e-5)
        for i, text in enumerate(TEXTS):  # a sequence in a padded batch = the same sequence on its own
            one_ids = torch.tensor(tok.tokenize([text]))
            one_mask = torch.ones_like(one_ids)
            n = one_ids.shape[1]
            assert torch.allclose(model(one_ids, one_mask)[0], padded[i, :n], atol=1e-5)


def test_padding_content_changes_nothing(tok):
    # gates, LayerNorm, dropout-free layers and pooling all run over padded positions too: none may leak
    model = tiny().eval()
    ids, mask = batch(tok)
    noisy = ids.clone()
    pad = mask == 0
    noisy[pad] = torch.randint(1000, 20000, (int(pad.sum()),))
    with torch.no_grad():
        a, b = model(ids, mask), model(noisy, mask)
        assert torch.allclose(a[mask.bool()], b[mask.bool()], atol=1e-6)
        assert not torch.allclose(a[pad], b[pad])  # the padding positions did see different input
        assert torch.allclose(model.embed(ids, mask), model.embed(noisy, mask), atol=1e-6)


def test_attention_pool_against_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    states, scores = torch.randn(3, 6, 5, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])
    expected = []
    for i in range(3):
        n = int(mask[i].sum())
        w = [float(torch.exp(scores[i, t])) for t in range(n)]
        expected.append(sum(w[t] / sum(w) * states[i, t] for t in range(n)))
    assert torch.allclose(attention_pool(states, scores, mask), torch.stack(expected), atol=1e-6)
    garbage_s, garbage_sc = states.clone(), scores.clone()
    garbage_s[mask == 0], garbage_sc[mask == 0] = 1e4, 1e4  # large values at padding must not matter
    assert torch.allclose(attention_pool(garbage_s, garbage_sc, mask), torch.stack(expected), atol=1e-6)


def test_mean_and_max_pooling_against_naive_loops():
    g = torch.Generator().manual_seed(1)
    states = torch.randn(3, 6, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]])
    model = {mode: tiny(pooling=mode) for mode in ("mean", "max")}
    mean, most = [], []
    for i in range(3):
        rows = [states[i, t] for t in range(int(mask[i].sum()))]
        mean.append(sum(rows) / len(rows))
        most.append(torch.tensor([max(float(r[h]) for r in rows) for h in range(5)]))
    garbage = states.clone()
    garbage[mask == 0] = 1e4  # padding must never be averaged in or win the max
    for s in (states, garbage):
        assert torch.allclose(model["mean"].pooled(s, mask), torch.stack(mean), atol=1e-6)
        assert torch.allclose(model["max"].pooled(s, mask), torch.stack(most), atol=1e-6)
        assert torch.equal(max_pool(s, mask), model["max"].pooled(s, mask))
    assert model["mean"].pool is None and model["max"].pool is None  # no parameters of their own


VARIANTS = {"no highway": dict(highway=False), "mean": dict(pooling="mean"), "max": dict(pooling="max"),
            "narrow table, one layer": dict(embed_size=6, num_layers=1)}


@pytest.mark.parametrize("kw", VARIANTS.values(), ids=VARIANTS.keys())
def test_each_student_variant_embeds_ignores_padding_and_round_trips(tok, tmp_path, kw):
    torch.manual_seed(0)
    cfg = LSTMConfig(**{**dict(embed_size=24, hidden_size=8, num_layers=2, dim=12, dropout=0.0), **kw})
    model = BiLSTMEncoder(cfg).eval()
    ids, mask = batch(tok)
    noisy = ids.clone()
    noisy[mask == 0] = 999
    with torch.no_grad():
        e = model.embed(ids, mask)
        assert e.shape == (len(TEXTS), 12)
        assert torch.allclose(e.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)
        assert torch.allclose(e, model.embed(ids, mask, packed=True), atol=1e-5)
        assert torch.allclose(e, model.embed(noisy, mask), atol=1e-6)
    assert all((layer.gate is None) == (cfg.highway is False) for layer in model.layers)
    folder = Embedder(model, tok, device="cpu").save(tmp_path / "v")
    saved = json.loads((folder / "bge_config.json").read_text())
    assert (saved["pooling"], saved["highway"], saved["embed_size"]) == (cfg.pooling, cfg.highway, cfg.embed_size)
    back = load(str(folder), device="cpu")
    assert back.model.cfg == cfg
    with torch.no_grad():
        assert torch.equal(back.model.embed(ids, mask), model.embed(ids, mask))


def test_unknown_pooling_is_an_error_naming_the_choices(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown pooling 'cls' \\(attention, mean, max\\)"):
        tiny(pooling="cls")
    folder = Embedder(tiny(), tok, device="cpu").save(tmp_path / "p")
    cfg = json.loads((folder / "bge_config.json").read_text())
    (folder / "bge_config.json").write_text(json.dumps({**cfg, "pooling": "cls"}))
    with pytest.raises(UserError, match="invalid configuration .*unknown pooling 'cls'"):
        load(str(folder))


def test_pca_project_against_the_covariance_eigenvectors():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(200, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0  # correlated, off-centre
    got = pca_project(table, 3)
    centred = (table - table.mean(0)).double()
    values, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending
    naive = (centred @ vectors[:, [5, 4, 3]]).float()  # the three largest, largest first
    signs = torch.sign((got * naive).sum(0))  # a component's sign is arbitrary
    assert torch.allclose(got * signs, naive, atol=1e-4)
    variances = got.var(0)
    assert variances[0] >= variances[1] >= variances[2]


def test_from_encoder_knobs_reach_the_student():
    torch.manual_seed(0)
    bert = Encoder(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    narrow = BiLSTMEncoder.from_encoder(bert, hidden_size=8, num_layers=1, embed_dim=10, pooling="max", highway=False)
    assert narrow.emb.weight.shape == (bert.cfg.vocab_size, 10) and narrow.cfg.embed_size == 10
    assert torch.allclose(narrow.emb.weight, pca_project(bert.emb.word.weight.detach(), 10))
    assert narrow.cfg.pooling == "max" and narrow.layers[0].gate is None
    fresh = BiLSTMEncoder.from_encoder(bert, hidden_size=8, num_layers=1, embed_init="random")
    assert fresh.emb.weight.std() < 0.03 and not torch.equal(fresh.emb.weight, bert.emb.word.weight)
    with pytest.raises(UserError, match="--lstm-embed-dim must be between 1 and the model's hidden size 32"):
        BiLSTMEncoder.from_encoder(bert, hidden_size=8, num_layers=1, embed_dim=33)


def test_embeddings_are_unit_vectors_and_dim_is_the_config_dim(tok):
    model = tiny().eval()
    with torch.no_grad():
        e = model.embed(*batch(tok))
    assert e.shape == (len(TEXTS), 12) and model.dim == 12
    assert torch.allclose(e.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-6)


def test_from_encoder_copies_the_word_embeddings():
    torch.manual_seed(0)
    bert = Encoder(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    lstm = BiLSTMEncoder.from_encoder(bert, hidden_size=8, num_layers=1)
    assert torch.equal(lstm.emb.weight, bert.emb.word.weight)
    assert lstm.dim == 32 and isinstance(lstm.proj, torch.nn.Linear)  # 32 -> 16: projected
    assert BiLSTMEncoder.from_encoder(bert, hidden_size=16, num_layers=1, dim=7).dim == 7
    assert isinstance(BiLSTMEncoder.from_encoder(bert, hidden_size=16, num_layers=1).proj, torch.nn.Identity)


def test_save_load_round_trip(tok, tmp_path):
    model = tiny(seed=3)
    tok2 = Tokenizer.from_folder(tok.source, position_limit=512, max_length=100, query_prompt="query: ",
                                 passage_prompt="passage: ")
    emb = Embedder(model, tok2, device="cpu")
    folder = emb.save(tmp_path / "lstm")
    assert not (folder / "config.json").exists()  # nothing that transformers would mistake for its own
    saved = json.loads((folder / "bge_config.json").read_text())
    assert saved["arch"] == "bilstm" and saved["max_length"] == 100 and saved["query_prompt"] == "query: "
    assert saved["passage_prompt"] == "passage: "
    back = load(str(folder), device="cpu")
    assert isinstance(back.model, BiLSTMEncoder) and back.model.cfg == model.cfg
    assert back.tokenizer.max_length == 100 and back.tokenizer.query_prompt == "query: "
    assert back.tokenizer.passage_prompt == "passage: "
    assert back.fingerprint() == emb.fingerprint()
    back.model.set_dropout(0.3)  # a training-only rate: the same embeddings, so the same fingerprint
    assert back.model.cfg.dropout == 0.3 != model.cfg.dropout and back.fingerprint() == emb.fingerprint()
    texts = TEXTS + ["another"]
    assert torch.equal(torch.as_tensor(back.encode(texts, is_query=True)), torch.as_tensor(emb.encode(texts, is_query=True)))


def test_damaged_bilstm_folders_are_one_line_errors(tok, tmp_path):
    folder = Embedder(tiny(), tok, device="cpu").save(tmp_path / "lstm")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["layers.1.gate.weight"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["out.bias"] = torch.zeros(99)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing 1: layers.1.gate.weight; unexpected 1: extra.weight; "
                                        r"wrong shape 1: out.bias is \[99\], config wants \[12\]"):
        load(str(folder))
    cfg = json.loads((folder / "bge_config.json").read_text())
    (folder / "bge_config.json").write_text(json.dumps({**cfg, "arch": "gru"}))
    with pytest.raises(UserError, match="arch 'gru' is not supported"):
        load(str(folder))
    (folder / "bge_config.json").write_text(json.dumps({**cfg, "hiden_size": 3}))
    with pytest.raises(UserError, match="unknown keys hiden_size"):
        load(str(folder))


def test_tiny_bilstm_learns_32_pairs_to_in_batch_accuracy_one(tok):
    # 32 queries, each with its own passage sharing a rare word: a model that cannot learn would stay near 1/32
    words = ["chain", "brake", "tyre", "spoke", "saddle", "pedal", "crank", "valve"]
    colours = ["red", "blue", "green", "black"]
    pairs = [(f"which {w} is {c}", f"the {c} {w} is in the box") for w in words for c in colours]
    q_ids, q_mask = tok([q for q, _ in pairs])
    p_ids, p_mask = tok([p for _, p in pairs])
    model = tiny(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = torch.arange(32)
    for step in range(200):
        loss, acc = info_nce(model.embed(q_ids, q_mask), model.embed(p_ids, p_mask), target, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if acc == 1.0:
            break
    model.eval()
    with torch.no_grad():
        _, acc = info_nce(model.embed(q_ids, q_mask), model.embed(p_ids, p_mask), target, 0.05)
    assert acc == 1.0, f"accuracy {acc:.2f} after {step + 1} steps"


def test_train_bilstm_student_distilled_from_a_teacher(tiny_model_dir, tmp_path):
    import train
    from pathlib import Path
    lines = (Path(__file__).resolve().parents[1] / "examples" / "bike_repair.jsonl").read_text().splitlines(True)
    data = tmp_path / "bikes.jsonl"
    data.write_text("".join(lines[:40]))
    common = ["--data", str(data), "--model", str(tiny_model_dir), "--out-dir", str(tmp_path), "--batch-size", "8",
              "--group-size", "2", "--max-passage-length", "32", "--max-query-length", "16", "--max-steps", "3",
              "--arch", "bilstm", "--lstm-hidden", "8", "--lstm-layers", "2", "--distill-from", str(tiny_model_dir)]
    with pytest.raises(UserError, match="embeds in 32 dimensions, the student in 16: set --lstm-dim 32"):
        train.main(common + ["--run-name", "bad", "--lstm-dim", "16"])
    train.main(common + ["--run-name", "r", "--freeze-embeddings", "--freeze-layers", "1", "--grad-checkpointing",
                         "--contrastive-weight", "0"])
    student = load(str(tmp_path / "r" / "final"))
    teacher = load(str(tiny_model_dir))
    assert isinstance(student.model, BiLSTMEncoder) and student.dim == 32
    assert torch.equal(student.model.emb.weight, teacher.model.emb.word.weight)  # frozen: still the teacher's
    torch.manual_seed(42)  # what train.main does before building the student: --seed, load --model, from_encoder
    fresh = BiLSTMEncoder.from_encoder(load(str(tiny_model_dir)).model, hidden_size=8, num_layers=2)
    for name, p in fresh.state_dict().items():
        if name.startswith("layers.0."):  # frozen by --freeze-layers 1
            assert torch.equal(student.model.state_dict()[name], p), name
    assert not torch.equal(student.model.layers[1].gate.weight, fresh.layers[1].gate.weight)  # trained
    with pytest.raises(UserError, match="is a BiLSTM; pass --arch bilstm"):
        train.main(["--data", str(data), "--model", str(tmp_path / "r" / "final"), "--out-dir", str(tmp_path),
                    "--run-name", "r2"])
