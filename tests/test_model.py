"""The encoder, its weights and tokenizer against transformers and sentence-transformers (the oracles)."""
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

from bge import Embedder, UserError, load_model
from bge.model import Encoder, ModelConfig
from bge.tokenizer import QUERY_PROMPTS, Tokenizer, default_query_prompt
from bge.weights import hf_state_dict, load_weights

TEXTS = [
    "What causes a bicycle chain to skip under load?",
    "Tubeless tyres seal small punctures with liquid sealant. " * 120,  # > 512 tokens: truncated
    "ok",
    "Über naïve café: 中文 text, émojis 🙂 and numbers 3.14",
]


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return load_model(minilm_dir)


def hf_hidden(folder, ids, mask):
    hf = transformers.AutoModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state


def test_bundled_weights_match_transformers(minilm, minilm_dir):
    model, tok = minilm
    model.eval()
    ids, mask = tok(TEXTS, max_length=512)
    assert mask.sum(1).tolist()[1] == 512 and ids.shape[1] == 512
    # the token ids are transformers' own
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    enc = hf_tok(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    ref = hf_hidden(minilm_dir, ids, mask)
    with torch.no_grad():
        ours = model(ids, mask)
        packed = model.forward_packed(ids, mask)
    real = mask.bool()
    assert (ours - ref)[real].abs().max() <= 1e-4
    assert (packed - ref[real]).abs().max() <= 1e-4


def test_bundled_embeddings_match_sentence_transformers(minilm_dir):
    emb = Embedder.load(str(minilm_dir), device="cpu")
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    assert emb.tokenizer.max_length == st.max_seq_length == 256
    ours = torch.from_numpy(emb.encode(TEXTS, batch_size=3))
    theirs = torch.from_numpy(st.encode(TEXTS, batch_size=3))
    assert F.cosine_similarity(ours, theirs).min() >= 0.99999
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)


def tiny_hf_model(flavour: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if flavour == "bert":
        cfg = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **common)
        return transformers.BertModel(cfg).eval()
    cfg = transformers.XLMRobertaConfig(vocab_size=1000, max_position_embeddings=8194, pad_token_id=1,
                                        bos_token_id=0, eos_token_id=2, type_vocab_size=1, layer_norm_eps=1e-5, **common)
    return transformers.XLMRobertaModel(cfg).eval()


@pytest.mark.parametrize("flavour", ["bert", "xlm-roberta"])
def test_tiny_random_models_match_transformers(flavour, tmp_path):
    hf = tiny_hf_model(flavour)
    hf.save_pretrained(tmp_path)  # safetensors
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.flavour == flavour and cfg.num_layers == 2
    model = Encoder(cfg).eval()
    from bge.weights import read_safetensors
    load_weights(model, read_safetensors(tmp_path), str(tmp_path))
    g = torch.Generator().manual_seed(1)
    pad = cfg.pad_token_id
    ids = torch.randint(3, 1000, (3, 21), generator=g)
    mask = torch.ones_like(ids)
    for row, n in ((1, 7), (2, 15)):  # right padding of different lengths
        ids[row, n:], mask[row, n:] = pad, 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = model(ids, mask)
        packed = model.forward_packed(ids, mask)
    real = mask.bool()
    assert (ours - ref)[real].abs().max() <= 1e-5
    assert (packed - ref[real]).abs().max() <= 1e-5
    if flavour == "xlm-roberta":  # positions count from padding_idx + 1 and the table has 8194 rows
        assert model.position_ids(mask)[1].tolist()[:8] == [2, 3, 4, 5, 6, 7, 8, 1]
        assert cfg.max_tokens == 8192


@pytest.mark.parametrize("pooling,prompt,passage_prompt", [("mean", "", ""), ("cls", QUERY_PROMPTS["en"], "passage: ")])
def test_export_round_trip(minilm, tmp_path, pooling, prompt, passage_prompt):
    model, tok = minilm
    model.eval()  # the comparison with transformers below calls the model directly: no dropout
    model.cfg.pooling, tok.query_prompt, tok.passage_prompt = pooling, prompt, passage_prompt
    try:
        emb = Embedder(model, tok, device="cpu")
        emb.save(tmp_path / "out")
        ours_q = torch.from_numpy(emb.encode(TEXTS, is_query=True))
        ours_p = torch.from_numpy(emb.encode(TEXTS, is_passage=True))
        ours_d = torch.from_numpy(emb.encode(TEXTS))
    finally:
        model.cfg.pooling, tok.query_prompt, tok.passage_prompt = "mean", "", ""
    out = tmp_path / "out"
    st = SentenceTransformer(str(out), device="cpu")
    theirs_d = torch.from_numpy(st.encode(TEXTS))
    theirs_q = torch.from_numpy(st.encode(TEXTS, prompt_name="query") if prompt else st.encode(TEXTS))
    theirs_p = torch.from_numpy(st.encode_document(TEXTS))  # the first of "document", "passage", "corpus"
    assert F.cosine_similarity(ours_d, theirs_d).min() >= 0.99999
    assert F.cosine_similarity(ours_q, theirs_q).min() >= 0.99999
    assert F.cosine_similarity(ours_p, theirs_p).min() >= 0.99999
    if prompt:  # the instructions really changed the query and passage embeddings
        assert F.cosine_similarity(ours_q, ours_d).min() < 0.999
        assert F.cosine_similarity(ours_p, ours_d).min() < 0.999
    # transformers: same token states, and the pooler we never trained is carried through
    ids, mask = tok(TEXTS)
    with torch.no_grad():
        ref = hf_hidden(out, ids, mask)
        assert (model(ids, mask) - ref)[mask.bool()].abs().max() <= 1e-4
    assert "pooler.dense.weight" in load_file(str(out / "model.safetensors"))
    # and our loader reads its own export back with the same pooling and prompt
    again = Embedder.load(str(out), device="cpu")
    assert again.model.cfg.pooling == pooling and again.tokenizer.query_prompt == prompt
    assert again.tokenizer.passage_prompt == passage_prompt
    assert torch.allclose(torch.from_numpy(again.encode(TEXTS, is_query=True)), ours_q, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_folder_saved_by_sentence_transformers_loads(minilm_dir, tmp_path, pooling):
    # sentence-transformers 6 writes `"pooling_mode": "mean"` where older versions wrote one boolean per mode; read
    # either way, the embeddings must be theirs (a CLS guess on a mean-pooled model gave cosine 0.59)
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    st[1].pooling_mode = pooling
    st.save(str(tmp_path / "st"))
    pool_cfg = json.loads(next((tmp_path / "st").glob("1_Pooling/config.json")).read_text())
    assert pool_cfg.get("pooling_mode") == pooling  # the new format is the one under test
    ours = torch.from_numpy(Embedder.load(str(tmp_path / "st"), device="cpu").encode(TEXTS))
    assert F.cosine_similarity(ours, torch.from_numpy(st.encode(TEXTS))).min() >= 0.99999
    # the older format, and a pooling bge does not implement (an error, not a silent CLS)
    legacy = {"word_embedding_dimension": 384, "pooling_mode_cls_token": pooling == "cls",
              "pooling_mode_mean_tokens": pooling == "mean"}
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    again = torch.from_numpy(Embedder.load(str(tmp_path / "st"), device="cpu").encode(TEXTS))
    assert torch.allclose(again, ours, atol=1e-6)
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text('{"pooling_mode": "max"}')
    with pytest.raises(UserError, match="cls and mean pooling only"):
        Embedder.load(str(tmp_path / "st"), device="cpu")


def test_half_precision_and_prefixed_files_load(minilm, minilm_dir, tmp_path):
    model, tok = minilm
    for dtype, prefix in ((torch.float16, "bert."), (torch.bfloat16, "")):
        folder = tmp_path / str(dtype)
        folder.mkdir()
        sd = {prefix + k: v.to(dtype) for k, v in hf_state_dict(model).items()}
        sd["cls.predictions.bias"] = torch.zeros(30522, dtype=dtype)  # a BertForMaskedLM head: ignored
        save_file(sd, str(folder / "model.safetensors"))
        for f in ("config.json", "tokenizer.json", "modules.json"):
            (folder / f).write_bytes((minilm_dir / f).read_bytes())
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_bytes((minilm_dir / "1_Pooling" / "config.json").read_bytes())
        half, _ = load_model(folder)
        assert half.emb.word.weight.dtype == torch.float32
        for a, b in zip(half.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b.to(dtype).float())  # exactly the file's values, upcast


def test_loading_draws_no_random_weights_first(minilm_dir):
    """The encoder is built on the meta device and takes the file's tensors as its parameters: no random init to
    overwrite (the global RNG is left as it was, so a run's dropout draws do not depend on how its model was built),
    and no second copy of the weights while loading (README, "Where a real run's time and memory go")."""
    rng = torch.get_rng_state()
    model, _ = load_model(minilm_dir)
    assert torch.equal(torch.get_rng_state(), rng)
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.requires_grad and p.dtype == torch.float32 for p in params)
    # nothing left on the meta device (a buffer the file does not hold, say), and the model runs
    assert not any(t.is_meta for t in (*params, *model.buffers()))
    ids = torch.tensor([[101, 7592, 102]])
    assert torch.isfinite(model(ids, torch.ones_like(ids))).all()


def broken_copy(minilm_dir, tmp_path, edit):
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (folder / f).write_bytes((minilm_dir / f).read_bytes())
    sd = load_file(str(minilm_dir / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def test_missing_tensor_is_one_clear_line(minilm_dir, tmp_path):
    folder = broken_copy(minilm_dir, tmp_path, lambda sd: sd.pop("encoder.layer.3.output.dense.weight"))
    with pytest.raises(UserError) as e:
        load_model(folder)
    msg = str(e.value)
    assert "\n" not in msg and "missing 1: encoder.layer.3.output.dense.weight" in msg and str(folder) in msg


def test_wrong_shape_and_unexpected_are_one_clear_line(minilm_dir, tmp_path):
    def edit(sd):
        sd["encoder.layer.0.attention.self.key.weight"] = torch.zeros(384, 380)
        sd["encoder.layer.9.output.dense.weight"] = torch.zeros(3)
    with pytest.raises(UserError) as e:
        load_model(broken_copy(minilm_dir, tmp_path, edit))
    msg = str(e.value)
    assert "\n" not in msg
    assert "wrong shape 1: encoder.layer.0.attention.self.key.weight is [384, 380], config wants [384, 384]" in msg
    assert "unexpected 1: encoder.layer.9.output.dense.weight" in msg


def test_pickle_only_folder_is_refused(tmp_path, minilm_dir):
    (tmp_path / "config.json").write_bytes((minilm_dir / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UserError, match="never unpickle"):
        load_model(tmp_path)


def test_tokenizer_from_vocab_txt_equals_tokenizer_json(minilm_dir, tmp_path):
    (tmp_path / "vocab.txt").write_bytes((minilm_dir / "vocab.txt").read_bytes())
    (tmp_path / "tokenizer_config.json").write_bytes((minilm_dir / "tokenizer_config.json").read_bytes())
    from_vocab = Tokenizer.from_folder(tmp_path, position_limit=512)
    from_json = Tokenizer.from_folder(minilm_dir, position_limit=512)
    assert from_vocab.max_length == 512 and from_json.max_length == 256  # sentence_bert_config.json
    assert from_vocab.tokenize(TEXTS, max_length=512) == from_json.tokenize(TEXTS, max_length=512)


def test_tokenizer_padding_truncation_and_prompt(minilm):
    _, tok = minilm
    ids, mask = tok(["a b c", "one two three four five six seven eight nine ten"], max_length=9)
    assert ids.shape[1] == 16 and mask.sum(1).tolist() == [5, 9]  # truncated at 9, padded to a multiple of 8
    assert ids[1, 8].item() == 102 and ids[0, 5:].eq(tok.pad_id).all()  # [SEP] kept by truncation
    tok.query_prompt = QUERY_PROMPTS["en"]
    try:
        q = tok.tokenize(["bike"], is_query=True)[0]
        d = tok.tokenize(["bike"])[0]
        assert len(q) > len(d) + 5 and q[-2:] == d[-2:]
        assert tok.tokenize(["bike"], is_query=True, prompt="")[0] == d
    finally:
        tok.query_prompt = ""
    assert default_query_prompt("BAAI/bge-small-en-v1.5") == QUERY_PROMPTS["en"]
    assert default_query_prompt("BAAI--bge-large-zh-v1.5/main") == QUERY_PROMPTS["zh"]
    assert default_query_prompt("BAAI/bge-m3") == "" and default_query_prompt("all-MiniLM-L6-v2") is None


@pytest.mark.parametrize("prompts, passage_prompt", [
    ({"query": "q: ", "corpus": "c: ", "passage": "p: ", "document": "d: "}, "d: "),  # encode_document's order
    ({"query": "q: ", "corpus": "c: ", "passage": "p: "}, "p: "),  # E5's name
    ({"corpus": "c: "}, "c: "),
    ({"query": "q: "}, ""),  # a query instruction alone: passages bare
    (None, ""),
])
def test_passage_prompt_is_the_folders_document_prompt_and_reaches_passages_only(tiny_model_dir, tmp_path, prompts,
                                                                                passage_prompt):
    import shutil

    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    st = {"prompts": prompts} if prompts is not None else {}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st))
    tok = Tokenizer.from_folder(folder, position_limit=512)
    assert tok.passage_prompt == passage_prompt
    assert Tokenizer.from_folder(folder, position_limit=512, passage_prompt="x: ").passage_prompt == "x: "
    assert Embedder.load(str(folder), device="cpu", passage_prompt="").tokenizer.passage_prompt == ""
    tok.query_prompt, tok.passage_prompt = "question: ", "passage: "
    bare = lambda prefix: tok.tokenize([prefix + "bike"])
    assert tok.tokenize(["bike"], is_passage=True) == bare("passage: ")
    assert tok.tokenize(["bike"], is_query=True) == bare("question: ")  # never both
    assert tok.tokenize(["bike"]) == bare("")  # STS sentences and classification rows: none
    assert tok.tokenize(["bike"], is_passage=True, prompt="") == bare("")
    with pytest.raises(ValueError, match="not both"):
        tok.tokenize(["bike"], is_query=True, is_passage=True)
    embedder = Embedder.load(str(folder), device="cpu", passage_prompt="passage: ")
    assert (embedder.encode(["bike"], is_passage=True) == embedder.encode(["passage: bike"])).all()


def test_encode_keeps_input_order_and_batch_size_does_not_matter(minilm_dir):
    emb = Embedder.load(str(minilm_dir), device="cpu")
    one = emb.encode(TEXTS, batch_size=1)
    four = emb.encode(TEXTS, batch_size=4)
    assert abs(one - four).max() < 1e-5
    single = emb.encode([TEXTS[2]])
    assert abs(single[0] - one[2]).max() < 1e-5
    with pytest.raises(TypeError):
        emb.encode("a string, not a list")


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager FlexAttention warns that it is the slow reference
def test_packed_paths_equal_padded_outputs_and_gradients(minilm):
    model, tok = minilm
    model.eval()
    texts = TEXTS + ["a much shorter one", "x"]
    ids, mask = tok(texts, max_length=64)
    real = mask.bool()
    with torch.no_grad():
        ref = model(ids, mask)[real]
        for attention in ("sdpa", "flex"):  # flex: one document-masked sequence (the CUDA path), eager here
            model.attention = attention
            assert (model.forward_packed(ids, mask) - ref).abs().max() <= 1e-5, attention
    model.attention = "sdpa"
    grads = []
    for packed in (False, True):
        model.zero_grad()
        model.embed(ids, mask, packed=packed).pow(2).sum(0)[:7].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-5


@pytest.mark.parametrize("seconds_per_batch, show_progress, shown_at", [
    (0.5, None, None),  # 4 batches in 2 s: done before a bar is worth drawing
    (1.5, None, 2),  # a slow encoding of only 8 texts: the bar appears at the batch after 2 s have passed
    (0.5, True, 0),
    (1.5, False, None),
])
def test_encode_shows_a_bar_once_it_has_run_two_seconds(tiny_model_dir, monkeypatch, seconds_per_batch, show_progress,
                                                       shown_at):
    """No timed test: a fake clock advances by `seconds_per_batch` per batch; the bar's start is recorded."""
    import bge.embedder as embedder_module

    emb = Embedder.load(str(tiny_model_dir), device="cpu")
    clock, batches, starts = [0.0], [], []
    monkeypatch.setattr(embedder_module.time, "perf_counter", lambda: clock[0])
    embed = emb.model.embed

    def slow_embed(ids, mask):
        batches.append(len(ids))
        clock[0] += seconds_per_batch
        return embed(ids, mask)

    def record_start(bar):
        starts.append(len(batches))
        bar.start()

    monkeypatch.setattr(emb.model, "embed", slow_embed)
    monkeypatch.setattr(embedder_module, "_start", record_start)
    out = emb.encode(TEXTS * 2, batch_size=2, show_progress=show_progress)
    assert len(batches) == 4 and out.shape == (8, emb.dim)
    assert starts == ([] if shown_at is None else [shown_at])
