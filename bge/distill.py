"""The teacher of a distillation run: its embeddings of the training texts, each computed once and kept.

Why a lazy cache rather than a teacher forward per batch or a pass over the whole training file up front: the
teacher runs in eval mode (no dropout), so a text's embedding never changes; caching computes each text once
however many epochs see it (three epochs: a third of the per-batch cost), and computing on first use encodes only
the texts the sampler draws (a FlagEmbedding file may list dozens of hard negatives per query of which a run
samples a few). The cache holds one row per text (384 floats = 1.5 kB for a small model); it is rebuilt on resume,
to the same values up to float rounding.
"""
from __future__ import annotations

import torch

from bge.batching import Batch
from bge.embedder import Embedder


class Teacher:
    """Teacher embeddings of a batch's queries ("q") and passages ("p"), without autograd, cached by text."""

    def __init__(self, embedder: Embedder, *, max_query_length: int, max_passage_length: int, cpu_bf16: bool = False,
                 batch_size: int = 128):
        self.embedder = embedder
        self.max_length = {"q": max_query_length, "p": max_passage_length}
        self.cpu_bf16 = cpu_bf16
        self.batch_size = batch_size
        self.cache: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def _lookup(self, kind: str, texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if (kind, t) not in self.cache]
        if new:
            emb = self.embedder.encode(new, batch_size=self.batch_size, max_length=self.max_length[kind],
                                       as_numpy=False, show_progress=False, cpu_bf16=self.cpu_bf16)
            self.cache.update(((kind, t), e) for t, e in zip(new, emb))
        return torch.stack([self.cache[kind, t] for t in texts])

    def embed(self, batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
        """{"q": (B, d), "p": (P, d)} in the batch's order; queries carry the teacher's own instruction."""
        queries = batch.query_texts(self.embedder.tokenizer.query_prompt)
        passages = batch.passage_texts(self.embedder.tokenizer.query_prompt)
        return {"q": self._lookup("q", queries).to(device), "p": self._lookup("p", passages).to(device)}
