"""Tokenizer glue: a Hugging Face `tokenizers` tokenizer plus what BGE needs around it
(truncation, padding to a multiple of 8, and the instructions: the query one on queries, the passage one on passages)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from bge.errors import UserError

# The instructions BGE v1.5 models were trained with for short-query -> passage retrieval.
QUERY_PROMPTS = {
    "en": "Represent this sentence for searching relevant passages: ",
    "zh": "为这个句子生成表示以用于检索相关文章：",
}
# the prompt names sentence-transformers' encode_document looks up, in its order (E5's "passage: ", nomic's
# "search_document: ")
DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")
PAD_TO_MULTIPLE = 8  # tensor-core and AVX-512 friendly shapes, and fewer distinct shapes for torch.compile


def default_query_prompt(name: str) -> str | None:
    """The instruction BAAI publishes for a model, guessed from its name; '' when it publishes none (bge-m3); None
    when the name says nothing (not a BGE model)."""
    n = name.lower()
    if "bge-m3" in n:
        return ""
    for lang, prompt in QUERY_PROMPTS.items():
        if re.search(rf"bge-[a-z]+-{lang}\b", n):
            return prompt
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None


def _wordpiece_from_vocab(vocab: Path, lowercase: bool) -> HFTokenizer:
    """What BertTokenizerFast builds from a bare vocab.txt."""
    tk = HFTokenizer(models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.BertProcessing(("[SEP]", sep_id), ("[CLS]", cls_id))
    tk.decoder = decoders.WordPiece()
    return tk


class Tokenizer:
    """Text -> padded (input_ids, attention_mask) tensors. Holds the default max length and the query and passage
    prompts."""

    def __init__(self, tk: HFTokenizer, *, max_length: int, position_limit: int, query_prompt: str = "",
                 passage_prompt: str = "", pad_id: int = 0, hf_files: dict | None = None, source: Path | None = None):
        tk.no_padding()
        tk.no_truncation()
        self.tk = tk
        self.max_length = max_length  # default truncation length (sentence-transformers' max_seq_length)
        self.position_limit = position_limit  # longest sequence the model's position table allows
        self.query_prompt = query_prompt
        self.prompt_stated = True  # False: nothing said which instruction queries take (bge.prepare picks one)
        self.passage_prompt = passage_prompt
        self.pad_id = pad_id
        self.hf_files = hf_files or {}  # tokenizer_config.json / special_tokens_map.json, written back on save
        self.source = source
        self._truncating: dict[int, HFTokenizer] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, *, position_limit: int, max_length: int | None = None,
                    query_prompt: str | None = None, passage_prompt: str | None = None,
                    name: str = "") -> "Tokenizer":
        """Load tokenizer.json (or build a WordPiece tokenizer from vocab.txt) and the sentence-transformers
        settings: max_seq_length from sentence_bert_config.json; from config_sentence_transformers.json the query
        prompt (else the instruction BAAI publishes for `name`, else none and `prompt_stated` False) and the
        passage prompt (the first of DOCUMENT_PROMPT_NAMES, else none). A prompt passed here overrides the folder's."""
        folder = Path(folder)
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")
        if (folder / "tokenizer.json").exists():
            tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.txt").exists():
            tk = _wordpiece_from_vocab(folder / "vocab.txt", tok_cfg.get("do_lower_case", True))
        else:
            raise UserError(f"{folder}: no tokenizer.json or vocab.txt")
        st_cfg = _read_json(folder / "sentence_bert_config.json")
        if max_length is None:
            max_length = st_cfg.get("max_seq_length") or min(tok_cfg.get("model_max_length", 512), position_limit)
        prompts = _read_json(folder / "config_sentence_transformers.json").get("prompts") or {}
        stated = query_prompt if query_prompt is not None else prompts.get("query",
                                                                            default_query_prompt(name or str(folder)))
        if passage_prompt is None:
            passage_prompt = next((prompts[k] for k in DOCUMENT_PROMPT_NAMES if k in prompts), "")
        pad = special.get("pad_token", tok_cfg.get("pad_token", "[PAD]"))
        pad = pad["content"] if isinstance(pad, dict) else pad
        pad_id = tk.token_to_id(pad)
        if pad_id is None:
            raise UserError(f"{folder}: pad token {pad!r} is not in the vocabulary")
        files = {"tokenizer_config.json": tok_cfg, "special_tokens_map.json": special}
        tokenizer = cls(tk, max_length=min(max_length, position_limit), position_limit=position_limit,
                        query_prompt=stated or "", passage_prompt=passage_prompt or "", pad_id=pad_id,
                        hf_files=files, source=folder)
        tokenizer.prompt_stated = stated is not None
        return tokenizer

    def _with_truncation(self, max_length: int) -> HFTokenizer:
        # one copy per length instead of mutating a shared tokenizer, so threads may tokenise concurrently
        if max_length not in self._truncating:
            tk = HFTokenizer.from_str(self.tk.to_str())
            tk.enable_truncation(max_length)
            self._truncating[max_length] = tk
        return self._truncating[max_length]

    def tokenize(self, texts: list[str], *, max_length: int | None = None, is_query: bool = False,
                 is_passage: bool = False, prompt: str | None = None) -> list[list[int]]:
        """Token ids with [CLS]/[SEP], truncated to max_length; queries get the query prompt, passages the passage
        prompt (either replaced by `prompt`), other texts (STS sentences, classification rows) none."""
        if is_query and is_passage:
            raise ValueError("a text is encoded as a query or as a passage, not both")
        max_length = min(max_length or self.max_length, self.position_limit)
        if is_query or is_passage:
            own = self.query_prompt if is_query else self.passage_prompt
            prefix = own if prompt is None else prompt
            texts = [prefix + t for t in texts]
        return [e.ids for e in self._with_truncation(max_length).encode_batch(texts)]

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the batch's longest sequence rounded up to a multiple of 8 (within the position table)."""
        longest = max(len(x) for x in ids)
        width = max(longest, min(-(-longest // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE, self.position_limit))
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        return input_ids, mask

    def __call__(self, texts: list[str], **kw) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pad(self.tokenize(texts, **kw))

    def save(self, folder: str | Path, model_type: str) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (and vocab.txt if we have it)."""
        folder = Path(folder)
        self.tk.save(str(folder / "tokenizer.json"))
        tok_cfg = dict(self.hf_files.get("tokenizer_config.json") or {})
        if not tok_cfg:
            flavour = "XLMRobertaTokenizer" if model_type == "xlm-roberta" else "BertTokenizer"
            tok_cfg = {"tokenizer_class": flavour, "do_lower_case": True}
        tok_cfg["model_max_length"] = self.position_limit
        special = self.hf_files.get("special_tokens_map.json") or {}
        for key, token in (("pad_token", self.tk.id_to_token(self.pad_id)),
                           ("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("unk_token", "[UNK]"), ("mask_token", "[MASK]")):
            if key not in tok_cfg and key not in special and self.tk.token_to_id(token) is not None:
                tok_cfg[key] = token
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        if special:
            (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False), encoding="utf-8")
        for extra in ("vocab.txt", "sentencepiece.bpe.model"):
            if self.source is not None and (self.source / extra).exists():
                shutil.copyfile(self.source / extra, folder / extra)
