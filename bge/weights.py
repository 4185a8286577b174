"""Model folders: Hugging Face safetensors <-> our Encoder, and export in the layout that
`transformers.AutoModel` and `sentence_transformers.SentenceTransformer` load unchanged.

The name mapping is data (`hf_names`); loading checks that every tensor is used once and has the
right shape, and fails with one line listing what is missing, unexpected or mis-shaped.

A gated BiLSTM (bge/lstm.py) has no Hugging Face counterpart: its folder holds `bge_config.json`
({"arch": "bilstm", ...}), `model.safetensors` under our own names and the tokenizer files. `load_model` and
`save` choose by that file and by the model's class; nothing else tells the two apart."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bge.errors import UserError
from bge.lstm import BiLSTMEncoder, LSTMConfig
from bge.model import Encoder, ModelConfig
from bge.tokenizer import Tokenizer

PREFIXES = ("bert.", "roberta.")  # BertForX / XLMRobertaForX wrap the encoder under these
DROPPED = ("pooler.", "cls.", "lm_head.", "classifier.")  # heads we never use: not an error to find them
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # non-persistent in newer transformers
KEPT_AS_IS = ("pooler.",)  # carried through to the exported file so AutoModel finds its pooler

ST_MODULES = "sentence_transformers.models."
POOLING_MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens"}  # ours: the legacy keys
LEGACY_POOLING_KEYS = {**POOLING_MODES, "max": "pooling_mode_max_tokens",
                       "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                       "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
UNSUPPORTED_POOLING = tuple(k for m, k in LEGACY_POOLING_KEYS.items() if m not in POOLING_MODES)
BGE_CONFIG = "bge_config.json"  # our own architectures (the BiLSTM); HF ones have config.json
TOKENIZER_KEYS = ("max_length", "query_prompt", "passage_prompt")  # kept in bge_config.json next to the architecture


def hf_names(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(our name, HF names). Several HF tensors stacked on dim 0 make one of ours (the fused qkv)."""
    rows = [
        ("emb.word.weight", ("embeddings.word_embeddings.weight",)),
        ("emb.position.weight", ("embeddings.position_embeddings.weight",)),
        ("emb.token_type.weight", ("embeddings.token_type_embeddings.weight",)),
        ("emb.ln.weight", ("embeddings.LayerNorm.weight",)),
        ("emb.ln.bias", ("embeddings.LayerNorm.bias",)),
    ]
    for i in range(cfg.num_layers):
        hf = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            rows += [
                (f"layers.{i}.qkv.{p}", tuple(f"{hf}attention.self.{n}.{p}" for n in ("query", "key", "value"))),
                (f"layers.{i}.out.{p}", (f"{hf}attention.output.dense.{p}",)),
                (f"layers.{i}.ln1.{p}", (f"{hf}attention.output.LayerNorm.{p}",)),
                (f"layers.{i}.ffn_in.{p}", (f"{hf}intermediate.dense.{p}",)),
                (f"layers.{i}.ffn_out.{p}", (f"{hf}output.dense.{p}",)),
                (f"layers.{i}.ln2.{p}", (f"{hf}output.LayerNorm.{p}",)),
            ]
    return rows


def _read_json(path: Path, default=None):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors (or its shards), with the bert./roberta. prefix stripped."""
    index = _read_json(folder / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            hint = " (we load safetensors only and never unpickle pytorch_model.bin)" if (folder / "pytorch_model.bin").exists() else ""
            raise UserError(f"{path}: not found{hint}")
        try:
            tensors.update(load_file(str(path)))
        except SafetensorError as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    return {k.removeprefix(PREFIXES[0]).removeprefix(PREFIXES[1]): v for k, v in tensors.items()}


def _listing(label: str, names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"{label} {len(names)}: {shown}"


def load_weights(model: Encoder, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy HF-named tensors into the model (cast to its dtype); one clear UserError if anything is off."""
    ours = model.state_dict()
    new, used, missing, misshaped = {}, set(), [], []
    for name, hf in hf_names(model.cfg):
        want = (ours[name].shape[0] // len(hf), *ours[name].shape[1:])
        ok = True
        for n in hf:
            if n not in tensors:
                missing.append(n)
            elif tuple(tensors[n].shape) != want:
                misshaped.append(f"{n} is {list(tensors[n].shape)}, config wants {list(want)}")
            else:
                continue
            ok = False
        used.update(hf)
        if ok:
            new[name] = torch.cat([tensors[n] for n in hf]) if len(hf) > 1 else tensors[hf[0]]
    unexpected = [n for n in tensors if n not in used and not n.startswith(DROPPED) and n not in BUFFERS]
    problems = [_listing(label, names) for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if names]
    if problems:
        raise UserError(f"{source}: weights do not match config.json: " + "; ".join(problems))
    assert set(new) == set(ours), "hf_names must cover every parameter of the model"
    # assign: the file's tensors become the parameters (a model built on the meta device has no memory to copy into)
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in new.items()}, assign=True)
    model.passthrough = {k: v for k, v in tensors.items() if k.startswith(KEPT_AS_IS)}


def read_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalize) from sentence-transformers' modules.json; CLS + normalise (BGE's) when absent.
    Pooling configs come in two shapes: `pooling_mode: "mean"` (sentence-transformers 6) or one boolean per mode
    (`pooling_mode_mean_tokens: true`, older versions); a mode bge does not implement is an error, never a guess."""
    modules = _read_json(folder / "modules.json")
    if not modules:
        return "cls", True
    pooling, normalize = "cls", False
    for m in modules:
        kind = m.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            path = folder / m["path"] / "config.json"
            cfg = _read_json(path, {})
            mode = cfg.get("pooling_mode")
            if mode is None:
                mode = [name for name, key in LEGACY_POOLING_KEYS.items() if cfg.get(key)] or "cls"
            modes = [mode] if isinstance(mode, str) else list(mode)
            if len(modes) != 1 or modes[0] not in POOLING_MODES:
                raise UserError(f"{path}: pooling {'+'.join(map(str, modes))}; bge implements cls and mean pooling only")
            if modes[0] == "mean" and cfg.get("include_prompt") is False:
                raise UserError(f"{path}: mean pooling without the prompt tokens (include_prompt false) is not supported")
            pooling = modes[0]
        normalize |= kind == "Normalize"
    return pooling, normalize


def load_model(folder: str | Path, *, name: str = "", max_length: int | None = None,
               query_prompt: str | None = None, passage_prompt: str | None = None) -> tuple[Encoder, Tokenizer]:
    """Encoder and tokenizer from a folder holding config.json, model.safetensors and tokenizer files."""
    folder = Path(folder)
    if (folder / BGE_CONFIG).exists():
        return load_bilstm(folder, name=name, max_length=max_length, query_prompt=query_prompt,
                           passage_prompt=passage_prompt)
    hf = _read_json(folder / "config.json")
    if hf is None:
        raise UserError(f"{folder}: no config.json (is this a model folder?)")
    pooling, normalize = read_pooling(folder)
    cfg = ModelConfig.from_hf(hf, pooling=pooling, normalize=normalize, source=str(folder / "config.json"))
    with torch.device("meta"):  # no memory and no random init for weights the file replaces: a load costs one copy
        model = Encoder(cfg)
    load_weights(model, read_safetensors(folder), str(folder))
    tokenizer = Tokenizer.from_folder(folder, position_limit=cfg.max_tokens, max_length=max_length,
                                      query_prompt=query_prompt, passage_prompt=passage_prompt, name=name)
    return model, tokenizer


def hf_state_dict(model: Encoder) -> dict[str, torch.Tensor]:
    """Our parameters under HF BertModel names (qkv split back into query, key, value)."""
    ours = model.state_dict()
    out = {}
    for name, hf in hf_names(model.cfg):
        for n, t in zip(hf, ours[name].chunk(len(hf))):
            out[n] = t.detach().float().contiguous().cpu()
    for n, t in model.passthrough.items():
        out[n] = t.float().contiguous().cpu()
    return out


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_sentence_transformers_files(folder: Path, dim: int, pooling: str, normalize: bool,
                                      max_length: int, query_prompt: str, passage_prompt: str) -> None:
    """modules.json and friends. Without modules.json sentence-transformers silently mean-pools; the passage
    prompt goes under "document", which encode_document applies."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_MODULES + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_MODULES + "Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_MODULES + "Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    _write_json(folder / "modules.json", modules)
    pool_cfg = {"word_embedding_dimension": dim, **{k: False for k in (*POOLING_MODES.values(), *UNSUPPORTED_POOLING)}}
    pool_cfg[POOLING_MODES[pooling]] = True
    _write_json(folder / "1_Pooling" / "config.json", pool_cfg)
    _write_json(folder / "sentence_bert_config.json", {"max_seq_length": max_length, "do_lower_case": False})
    _write_json(folder / "config_sentence_transformers.json",
                {"prompts": {"query": query_prompt, "document": passage_prompt}, "default_prompt_name": None,
                 "similarity_fn_name": "cosine"})


@contextmanager
def writing(tmp: Path, folder: Path) -> Iterator[None]:
    """Write `folder`'s new content into `tmp`: a failed write (a full disk) removes tmp, keeps `folder` as it was and
    is one line, not a traceback and a half-written copy."""
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {folder} ({e.strerror or e}); the partial copy was removed") from None


def replace_folder(tmp: Path, folder: Path) -> None:
    """Swap a fully written tmp folder into place, so readers see the old or the new one, never half."""
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save(model: Encoder | BiLSTMEncoder, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """Write a folder that transformers and sentence-transformers load unchanged and that embeds identically
    (a BiLSTM: our own format, see save_bilstm)."""
    if isinstance(model, BiLSTMEncoder):
        return save_bilstm(model, tokenizer, folder)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    cfg = model.cfg
    with writing(tmp, folder):
        _write_json(tmp / "config.json", cfg.to_hf())
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp, cfg.flavour)
        write_sentence_transformers_files(tmp, cfg.hidden_size, cfg.pooling, cfg.normalize,
                                          tokenizer.max_length, tokenizer.query_prompt, tokenizer.passage_prompt)
    replace_folder(tmp, folder)
    return folder


# ---- the gated BiLSTM: our own format ---------------------------------------------------------------
def load_bilstm(folder: Path, *, name: str = "", max_length: int | None = None,
                query_prompt: str | None = None, passage_prompt: str | None = None) -> tuple[BiLSTMEncoder, Tokenizer]:
    """A BiLSTM and its tokenizer from a folder written by save_bilstm."""
    where = str(folder / BGE_CONFIG)
    saved = _read_json(folder / BGE_CONFIG)
    if not isinstance(saved, dict) or saved.get("arch") != "bilstm":
        arch = saved.get("arch") if isinstance(saved, dict) else None
        raise UserError(f"{where}: arch {arch!r} is not supported (only 'bilstm')")
    known = set(LSTMConfig.__dataclass_fields__)
    unknown = sorted(set(saved) - known - set(TOKENIZER_KEYS) - {"arch"})
    if unknown:
        raise UserError(f"{where}: unknown keys {', '.join(unknown)}")
    try:
        cfg = LSTMConfig(**{k: v for k, v in saved.items() if k in known})
        model = BiLSTMEncoder(cfg)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{where}: invalid configuration ({e})") from None
    tensors, ours = read_safetensors(folder), model.state_dict()
    problems = [_listing(label, names) for label, names in (
        ("missing", [n for n in ours if n not in tensors]),
        ("unexpected", [n for n in tensors if n not in ours]),
        ("wrong shape", [f"{n} is {list(t.shape)}, config wants {list(ours[n].shape)}"
                         for n, t in tensors.items() if n in ours and t.shape != ours[n].shape])) if names]
    if problems:
        raise UserError(f"{folder}: weights do not match {BGE_CONFIG}: " + "; ".join(problems))
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in tensors.items()})
    tokenizer = Tokenizer.from_folder(
        folder, position_limit=cfg.max_tokens, name=name,
        max_length=max_length if max_length is not None else saved.get("max_length"),
        query_prompt=query_prompt if query_prompt is not None else saved.get("query_prompt"),
        passage_prompt=passage_prompt if passage_prompt is not None else saved.get("passage_prompt"))
    return model, tokenizer


def save_bilstm(model: BiLSTMEncoder, tokenizer: Tokenizer, folder: str | Path) -> Path:
    """bge_config.json (architecture, max length, prompts), model.safetensors and the tokenizer files.
    Only bge reads this folder: transformers and sentence-transformers have no such architecture."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    with writing(tmp, folder):
        _write_json(tmp / BGE_CONFIG, {"arch": "bilstm", **model.cfg.to_dict(), "max_length": tokenizer.max_length,
                                       "query_prompt": tokenizer.query_prompt,
                                       "passage_prompt": tokenizer.passage_prompt})
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp, "bert")
    replace_folder(tmp, folder)
    return folder
