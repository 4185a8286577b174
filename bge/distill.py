"""The teacher of a distillation run: its embeddings of the training texts, each computed once and kept, in memory
and (with a store folder) on disk.

Why a lazy cache rather than a teacher forward per batch or a pass over the whole training file up front: the
teacher runs in eval mode (no dropout), so a text's embedding never changes; caching computes each text once
however many epochs see it (three epochs: a third of the per-batch cost), and computing on first use encodes only
the texts the sampler draws (a FlagEmbedding file may list dozens of hard negatives per query of which a run
samples a few; a --distill-corpus stage cuts new sentences and spans every epoch). The cache holds one row per text
(384 floats = 1.5 kB for a small model).

On disk: <store>/teacher-<key>/, where the key hashes the teacher's fingerprint (weights, configuration, tokenizer),
both max lengths and the arithmetic (device kind, bf16 or not), so another teacher, length or precision never
reads these rows. Each flush appends one safetensors shard (int64 text keys, float32 rows) under a fresh name, so
runs sharing a --cache-dir add to the same folder without clashing. train.py flushes right before each saved
state: a resumed run then finds every row the killed run had computed up to that state, and computes the later ones
in the same groups an uninterrupted run does, so resuming gives the same targets bit for bit.

`preload` takes a whole corpus's passage rows at once through the evaluation's corpus cache (bge.evaluation): a
teacher that is a fine-tuned run's best/ has had its test corpus encoded and kept there by that run, so a
--distill-corpus stage on the same corpus starts with every passage's target and encodes only the pieces.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bge.batching import Batch
from bge.checkpoint import atomic_write_text
from bge.embedder import Embedder
from bge.evaluation import CorpusCache, encode_corpus

STORE_FORMAT = 1  # bump when what a shard holds changes


def text_key(kind: str, text: str) -> int:
    """A stable signed 64-bit key of a text as the teacher embeds it ("q" or "p", with its instruction prefixed)."""
    return int.from_bytes(hashlib.blake2b(f"{kind}\0{text}".encode(), digest_size=8).digest(), "little", signed=True)


def read_store(folder: Path) -> dict[int, torch.Tensor]:
    """Every row of a store folder's shards, by text key (an unreadable shard is skipped: it is only a cache)."""
    rows: dict[int, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        try:
            t = load_file(str(shard))
            rows.update(zip(t["keys"].tolist(), t["emb"]))
        except (OSError, KeyError, RuntimeError, ValueError):  # safetensors raises its own errors as these
            continue
    return rows


class Teacher:
    """Teacher embeddings of a batch's queries ("q") and passages ("p"), without autograd, cached by text."""

    def __init__(self, embedder: Embedder, *, max_query_length: int, max_passage_length: int, cpu_bf16: bool = False,
                 batch_size: int = 128, store: str | Path | None = None):
        self.embedder = embedder
        self.max_length = {"q": max_query_length, "p": max_passage_length}
        self.cpu_bf16 = cpu_bf16
        self.batch_size = batch_size
        self.cache: dict[int, torch.Tensor] = {}  # text_key -> embedding
        self.unsaved: dict[int, torch.Tensor] = {}  # computed since the last flush
        self.folder = None
        if store is not None:
            about = {"format": STORE_FORMAT, "fingerprint": embedder.fingerprint(), "max_length": self.max_length,
                     "precision": self.precision()}
            key = hashlib.blake2b(json.dumps(about, sort_keys=True).encode(), digest_size=12).hexdigest()
            self.folder = Path(store) / f"teacher-{key}"
            self.folder.mkdir(parents=True, exist_ok=True)
            try:  # for a reader of the folder: whose rows these are
                atomic_write_text(self.folder / "teacher.json", json.dumps({"model": embedder.name, **about}) + "\n")
            except OSError:  # another run writing the same file at the same moment: theirs says the same
                pass
            self.cache.update(read_store(self.folder))

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def precision(self) -> str:
        """The arithmetic the teacher encodes in (bge.embedder.autocast): part of the store's key."""
        kind = self.embedder.device.type
        return f"{kind}:{'amp' if kind == 'cuda' else 'bf16' if self.cpu_bf16 else 'fp32'}"

    def lookup(self, kind: str, texts: list[str]) -> torch.Tensor:
        """(n, d) embeddings of texts ("q": queries, "p": passages, each with its instruction already prefixed), on
        the CPU; the texts not seen before are encoded together, in first-seen order."""
        keys = [text_key(kind, t) for t in texts]
        new = {k: t for k, t in zip(keys, texts) if k not in self.cache}
        if new:
            emb = self.embedder.encode(list(new.values()), batch_size=self.batch_size, max_length=self.max_length[kind],
                                       as_numpy=False, show_progress=False, cpu_bf16=self.cpu_bf16)
            for k, e in zip(new, emb):
                self.cache[k] = self.unsaved[k] = e
        return torch.stack([self.cache[k] for k in keys])

    def embed(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        """{"q": (B, d), "p": (P, d)} in the batch's order; queries and passages carry the teacher's own
        instructions."""
        tok = self.embedder.tokenizer
        queries = batch.query_texts(tok.query_prompt)
        passages = batch.passage_texts(tok.query_prompt, tok.passage_prompt)
        return {"q": self.lookup("q", queries).to(device), "p": self.lookup("p", passages).to(device)}

    def preload(self, corpus: dict[str, str], cache: CorpusCache) -> int:
        """Take every passage of `corpus` (id -> text) from the evaluation's corpus cache, encoding the corpus there on
        a miss (in length-sorted batches, cheaper than a few per step); returns how many were read, not encoded."""
        got = encode_corpus(self.embedder, corpus, batch_size=self.batch_size, max_length=self.max_length["p"],
                            cache_dir=cache, cpu_bf16=self.cpu_bf16)
        prompt = self.embedder.tokenizer.passage_prompt  # encode_corpus prefixed it, as embed's passages are
        for text, e in zip(corpus.values(), got.emb):
            self.cache.setdefault(text_key("p", prompt + text), e)
        return got.n_cached

    def flush(self) -> None:
        """Write the rows computed since the last flush to a new shard of the store (nothing without a store)."""
        if self.folder is None or not self.unsaved:
            return
        name = f"{time.time_ns():020d}-{os.getpid()}"
        tmp = self.folder / f"{name}.tmp"
        save_file({"keys": torch.tensor(list(self.unsaved), dtype=torch.int64),
                   "emb": torch.stack(list(self.unsaved.values())).float().contiguous()}, str(tmp))
        os.replace(tmp, self.folder / f"{name}.safetensors")  # whole or absent: a reader never sees half a shard
        self.unsaved = {}
