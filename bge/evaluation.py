"""Retrieval and STS evaluation: corpus embeddings cached on disk, exact dense search, trec_eval metrics.

evaluate.py and train.py's validation both call these. The pieces, in the order a retrieval evaluation runs:
    encode_corpus   passages -> embeddings (with the passage instruction), read from / written to
                    `{cache_dir}/{key}.safetensors`
    encode_queries  queries -> embeddings, each with its instruction (per-query, given, or the model's)
    rank            exact top-k by cosine similarity (bge.search.topk_search: chunked, bounded memory)
    search          the three above on a RetrievalData, with timings
    evaluate_retrieval / evaluate_sts   search or pair similarity, then bge.metrics
    evaluate_classification             kNN and linear-probe accuracy / macro-F1 of held-out rows
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from bge.data import ClassificationData, RetrievalData, STSData
from bge.embedder import Embedder, default_device
from bge.errors import UserError
from bge.loss import truncate
from bge.metrics import (RetrievalResult, classification_scores, knn_predict, linear_probe_predict, retrieval_metrics,
                         sts_correlations)
from bge.search import topk_search

DEFAULT_KS = (1, 3, 5, 10, 100)
KNN_K = 5  # neighbours that vote in kNN classification; fixed so that runs compare
CACHE_FORMAT = 1  # bump when the file layout or what the key covers changes


# ---- corpus embeddings and their cache ------------------------------------------------------------------
@dataclass
class CorpusEmbeddings:
    """Corpus embeddings in `ids` order, and how they were obtained."""

    ids: list[str]
    emb: torch.Tensor  # (n, dim) float32 on CPU
    n_encoded: int  # passages run through the model
    n_cached: int  # passages read from the cache
    seconds: float
    cache_file: Path | None = None


def effective_max_length(embedder: Embedder, max_length: int | None) -> int:
    """The truncation length encode() will use: `max_length`, else the model's, capped by its position table."""
    tok = embedder.tokenizer
    return min(max_length or tok.max_length, tok.position_limit)


def encode_precision(embedder: Embedder, cpu_bf16: bool) -> str:
    """The arithmetic encode() runs in: embeddings differ slightly between fp32 and bf16, so the cache keys on it."""
    if embedder.device.type == "cuda":
        return "cuda-bf16" if torch.cuda.is_bf16_supported() else "cuda-fp16"
    return f"{embedder.device.type}-{'bf16' if cpu_bf16 and embedder.device.type == 'cpu' else 'fp32'}"


def corpus_hash(ids: Sequence[str], texts: Sequence[str]) -> str:
    """A hash of the ids and texts, in order."""
    h = hashlib.blake2b(digest_size=16)
    for i, t in zip(ids, texts):
        h.update(f"{len(i)}:{i}{len(t)}:{t}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def cache_key(model: str, max_length: int, precision: str, corpus: str, passage_prompt: str = "") -> str:
    """The cache file's name stem: a hash of the model fingerprint, max length, precision, corpus hash and passage
    instruction."""
    parts = {"format": CACHE_FORMAT, "model": model, "max_length": max_length, "precision": precision, "corpus": corpus}
    if passage_prompt:  # only when there is one: the keys of passages encoded bare stay what they always were
        parts["passage_prompt"] = passage_prompt
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def _read_cache(path: Path, ids: list[str], dim: int) -> torch.Tensor | None:
    """The cached embeddings if `path` holds them for exactly these ids; None (re-encode) if absent or unreadable."""
    if not path.exists():
        return None
    try:
        tensors = load_file(str(path))
        cached_ids = json.loads(bytes(tensors["ids"].numpy()).decode("utf-8"))
        emb = tensors["embeddings"]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # a truncated or foreign file: encoding again overwrites it
    if cached_ids != ids or tuple(emb.shape) != (len(ids), dim) or emb.dtype != torch.float32:
        return None
    return emb


def _write_cache(path: Path, ids: list[str], emb: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write atomically (tmp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    blob = bytearray(json.dumps(ids, ensure_ascii=False).encode("utf-8"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb.contiguous(), "ids": torch.frombuffer(blob, dtype=torch.uint8)}, str(tmp),
                  metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the embedding cache {path} ({e.strerror}); pass --no-cache or another "
                        f"--cache-dir") from None


class CorpusCache:
    """Corpus embeddings by cache key (model fingerprint, max length, precision, corpus, passage instruction): in
    memory, and in `folder` on disk when one is given (read always, written when `write`). A training run validates
    a model and later tests the same weights (the base model at step 0, best/ at its step): the memory keeps the
    first model's embeddings and the latest `keep` others, so neither is encoded twice. Views made with `view()` share
    one memory."""

    def __init__(self, folder: str | Path | None = None, *, write: bool = True, keep: int = 2,
                 max_bytes: int = 2**30, memory: dict | None = None):
        self.folder, self.write, self.keep, self.max_bytes = (Path(folder) if folder else None), write, keep, max_bytes
        self.memory = {} if memory is None else memory  # key -> (ids, emb, metadata); order = recency; first pinned

    def view(self, *, write: bool) -> "CorpusCache":
        """The same memory and folder, with another disk-write policy."""
        return CorpusCache(self.folder, write=write, keep=self.keep, max_bytes=self.max_bytes, memory=self.memory)

    def path(self, key: str) -> Path | None:
        return self.folder / f"{key}.safetensors" if self.folder else None

    def get(self, key: str, ids: list[str], dim: int) -> torch.Tensor | None:
        hit = self.memory.get(key)
        if hit is not None and hit[0] == ids:
            if key != next(iter(self.memory)):  # refresh recency (the pinned first entry stays first)
                self.memory[key] = self.memory.pop(key)
            if self.folder and self.write and not self.path(key).exists():  # validated in memory, kept now
                _write_cache(self.path(key), ids, hit[1], hit[2])
            return hit[1]
        emb = _read_cache(self.path(key), ids, dim) if self.folder else None
        if emb is not None:
            self._remember(key, ids, emb, {})
        return emb

    def put(self, key: str, ids: list[str], emb: torch.Tensor, metadata: dict[str, str]) -> None:
        self._remember(key, ids, emb, metadata)
        if self.folder and self.write:
            _write_cache(self.path(key), ids, emb, metadata)

    def forget(self, model_fingerprint: str) -> None:
        """Drop that model's embeddings from memory: a training run calls it for a validated model that did not
        become best/, which nothing will test, so that best/'s stay for the test."""
        for key in [k for k, (_, _, meta) in self.memory.items() if meta.get("model") == model_fingerprint]:
            del self.memory[key]

    def _remember(self, key: str, ids: list[str], emb: torch.Tensor, metadata: dict[str, str]) -> None:
        if emb.numel() * emb.element_size() > self.max_bytes:
            return  # a corpus too big to hold in memory: the disk (if any) serves it
        self.memory.pop(key, None)
        self.memory[key] = (ids, emb, metadata)
        pinned, *rest = self.memory
        while rest and (len(rest) > self.keep or
                        sum(e.numel() * e.element_size() for _, e, _ in self.memory.values()) > self.max_bytes):
            del self.memory[rest.pop(0)]


def encode_corpus(embedder: Embedder, corpus: dict[str, str], *, batch_size: int = 64, max_length: int | None = None,
                  cache_dir: str | Path | CorpusCache | None = None, cpu_bf16: bool = False,
                  show_progress: bool | None = None) -> CorpusEmbeddings:
    """Embeddings of every passage, each with the model's passage instruction, in `corpus` order.

    With `cache_dir` (a folder, or a CorpusCache with memory), looks the embeddings up by a key that hashes the model
    fingerprint, the effective max length, the precision, the corpus (ids and texts) and the passage instruction (the
    fingerprint leaves the tokenizer's prompts out): in `{cache_dir}/{key}.safetensors`; on a miss it encodes and
    writes that file. Without `cache_dir` nothing is hashed."""
    ids = list(corpus)
    if not ids:
        raise UserError("the corpus is empty")
    texts = [corpus[i] for i in ids]
    length = effective_max_length(embedder, max_length)
    start = time.perf_counter()
    cache = cache_dir if isinstance(cache_dir, CorpusCache) or cache_dir is None else CorpusCache(cache_dir)
    if cache is not None:
        key = {"model": embedder.fingerprint(), "max_length": length,
               "precision": encode_precision(embedder, cpu_bf16), "corpus": corpus_hash(ids, texts),
               "passage_prompt": embedder.tokenizer.passage_prompt}
        stem = cache_key(**key)
        emb = cache.get(stem, ids, embedder.dim)
        if emb is not None:
            return CorpusEmbeddings(ids, emb, 0, len(ids), time.perf_counter() - start, cache.path(stem))
    emb = embedder.encode(texts, batch_size=batch_size, max_length=length, is_passage=True, as_numpy=False,
                          cpu_bf16=cpu_bf16, show_progress=show_progress, description="encoding corpus")
    if cache is not None:
        meta = {k: str(v) for k, v in key.items()} | {"format": str(CACHE_FORMAT), "model_name": embedder.name}
        cache.put(stem, ids, emb, meta)
    return CorpusEmbeddings(ids, emb, len(ids), 0, time.perf_counter() - start, cache.path(stem) if cache else None)


# ---- queries and search ---------------------------------------------------------------------------------
def encode_queries(embedder: Embedder, queries: dict[str, str], prompts: dict[str, str] | None = None, *,
                   query_prompt: str | None = None, batch_size: int = 64, max_length: int | None = None,
                   cpu_bf16: bool = False, show_progress: bool | None = None) -> tuple[list[str], torch.Tensor]:
    """(ids, (n, dim) embeddings) of the queries. Each gets its own instruction from `prompts` if it has one, else
    `query_prompt` if given, else the model's; queries sharing an instruction are encoded together."""
    ids = list(queries)
    groups: dict[str | None, list[int]] = {}
    for i, qid in enumerate(ids):
        groups.setdefault((prompts or {}).get(qid, query_prompt), []).append(i)
    emb = torch.empty(len(ids), embedder.dim)
    for prompt, rows in groups.items():
        emb[rows] = embedder.encode([queries[ids[i]] for i in rows], batch_size=batch_size, max_length=max_length,
                                    is_query=True, prompt=prompt, as_numpy=False, cpu_bf16=cpu_bf16,
                                    show_progress=show_progress, description="encoding queries")
    return ids, emb


def unit(x: torch.Tensor) -> torch.Tensor:
    """x with unit rows; normalising models' output passes through without a copy."""
    x = x.float()
    return x if len(x) == 0 or (x.norm(dim=1) - 1).abs().max() <= 1e-4 else F.normalize(x, dim=1)


def rank(query_ids: list[str], query_emb: torch.Tensor, corpus_ids: list[str], corpus_emb: torch.Tensor, k: int, *,
         ignore_identical_ids: bool = False, device: str | torch.device | None = None) -> dict[str, list[tuple[str, float]]]:
    """The k most cosine-similar corpus entries of each query, best first, as (doc id, score); ties go to the
    earlier corpus entry. With `ignore_identical_ids` a document whose id is the query's is skipped (MTEB does so for
    ArguAna), retrieving k + 1 so that k remain."""
    depth = k + 1 if ignore_identical_ids else k
    scores, idx = topk_search(unit(query_emb), unit(corpus_emb), depth, device=device or default_device())
    ranked = {}
    for qid, s_row, i_row in zip(query_ids, scores.tolist(), idx.tolist()):
        hits = [(corpus_ids[j], s) for j, s in zip(i_row, s_row)]
        if ignore_identical_ids:
            hits = [h for h in hits if h[0] != qid]
        ranked[qid] = hits[:k]
    return ranked


@dataclass
class Ranking:
    """What search() returns: ranked lists, timings and where the corpus embeddings came from."""

    ranked: dict[str, list[tuple[str, float]]]  # qid -> [(doc id, cosine)], best first
    seconds: dict[str, float]  # encode_corpus, encode_queries, search
    n_encoded: int  # passages run through the model
    n_cached: int  # passages read from the embedding cache
    cache_file: Path | None = None
    by_dim: dict[int, dict[str, list[tuple[str, float]]]] = field(default_factory=dict)  # Matryoshka sizes


def check_dims(embedder: Embedder, dims: Sequence[int]) -> list[int]:
    """The truncated sizes to score, largest first: each below the model's size (the full size is always scored)."""
    bad = [d for d in dims if not 0 < d <= embedder.dim]
    if bad:
        raise UserError(f"--dims {', '.join(map(str, bad))}: {embedder.name} embeddings have {embedder.dim} dimensions")
    return sorted({d for d in dims if d < embedder.dim}, reverse=True)


def search(embedder: Embedder, data: RetrievalData, *, k: int = 100, batch_size: int = 64,
           max_length: int | None = None, query_max_length: int | None = None, query_prompt: str | None = None,
           cache_dir: str | Path | CorpusCache | None = None,
           device: str | torch.device | None = None, ignore_identical_ids: bool = False, cpu_bf16: bool = False,
           show_progress: bool | None = None, dims: Sequence[int] = ()) -> Ranking:
    """Exact dense retrieval of the top k passages for every query of `data` (see encode_corpus, encode_queries and
    rank for the caching, the instructions and the order). Passages are truncated at `max_length`, queries at
    `query_max_length` (default: max_length). `device` runs the search (default: CUDA if present).
    Each size in `dims` is ranked too, on the same embeddings truncated and renormalised (Matryoshka)."""
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    dims = check_dims(embedder, dims)
    corpus = encode_corpus(embedder, data.corpus, batch_size=batch_size, max_length=max_length, cache_dir=cache_dir,
                           cpu_bf16=cpu_bf16, show_progress=show_progress)
    start = time.perf_counter()
    qids, q_emb = encode_queries(embedder, data.queries, data.prompts, query_prompt=query_prompt,
                                 batch_size=batch_size, max_length=query_max_length or max_length,
                                 cpu_bf16=cpu_bf16, show_progress=show_progress)
    encoded = time.perf_counter()
    ranked = rank(qids, q_emb, corpus.ids, corpus.emb, k, ignore_identical_ids=ignore_identical_ids, device=device)
    by_dim = {d: rank(qids, truncate(q_emb, d), corpus.ids, truncate(corpus.emb, d), k,
                      ignore_identical_ids=ignore_identical_ids, device=device) for d in dims}
    seconds = {"encode_corpus": corpus.seconds, "encode_queries": encoded - start,
               "search": time.perf_counter() - encoded}
    return Ranking(ranked, seconds, corpus.n_encoded, corpus.n_cached, corpus.cache_file, by_dim)


# ---- evaluations ----------------------------------------------------------------------------------------
@dataclass
class RetrievalEval:
    """Metrics (summary and per query) and the ranking they were computed from."""

    metrics: RetrievalResult
    ranking: Ranking
    ks: list[int] = field(default_factory=list)
    by_dim: dict[int, RetrievalResult] = field(default_factory=dict)  # metrics of truncated embeddings


def evaluate_retrieval(embedder: Embedder, data: RetrievalData, *, ks: Sequence[int] = DEFAULT_KS,
                       batch_size: int = 64, max_length: int | None = None, query_max_length: int | None = None,
                       query_prompt: str | None = None,
                       cache_dir: str | Path | CorpusCache | None = None, device: str | torch.device | None = None,
                       ignore_identical_ids: bool = False, cpu_bf16: bool = False,
                       show_progress: bool | None = None, dims: Sequence[int] = ()) -> RetrievalEval:
    """nDCG, MRR, recall, MAP and precision at each k (bge.metrics.retrieval_metrics, trec_eval's definitions) of
    `embedder` on `data`. Queries without a relevant document are dropped and counted, not scored as zero.
    `dims`: also score the embeddings truncated to these sizes (in `by_dim`), encoding only once."""
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise UserError(f"ks must be positive integers, got {ks}")
    if not any(g > 0 for rels in data.qrels.values() for g in rels.values()):
        raise UserError(f"{data.name or 'the data'}: no query has a relevant document (a qrels score above 0)")
    ranking = search(embedder, data, k=ks[-1], batch_size=batch_size, max_length=max_length,
                     query_max_length=query_max_length, query_prompt=query_prompt, cache_dir=cache_dir,
                     device=device, ignore_identical_ids=ignore_identical_ids, cpu_bf16=cpu_bf16,
                     show_progress=show_progress, dims=dims)

    def scored(ranked: dict[str, list[tuple[str, float]]]) -> RetrievalResult:
        docs = {q: [d for d, _ in hits] for q, hits in ranked.items()}
        return retrieval_metrics(data.qrels, docs, ks, ignore_identical_ids=ignore_identical_ids)

    return RetrievalEval(scored(ranking.ranked), ranking, ks, {d: scored(r) for d, r in ranking.by_dim.items()})


def evaluate_sts(embedder: Embedder, sts: STSData, *, batch_size: int = 64, max_length: int | None = None,
                 cpu_bf16: bool = False, show_progress: bool | None = None, dims: Sequence[int] = ()) -> dict:
    """Spearman and Pearson correlation of each pair's cosine similarity with the gold scores, as
    sentence-transformers' EmbeddingSimilarityEvaluator computes them. STS is symmetric: no instruction. Each
    distinct sentence is encoded once; also returns n_pairs, n_encoded and seconds, and under "by_dim" the
    correlations of the embeddings truncated to each size in `dims`."""
    start = time.perf_counter()
    dims = check_dims(embedder, dims)
    unique = list(dict.fromkeys(sts.sentence1 + sts.sentence2))
    row = {s: i for i, s in enumerate(unique)}
    full = embedder.encode(unique, batch_size=batch_size, max_length=max_length, as_numpy=False,
                           cpu_bf16=cpu_bf16, show_progress=show_progress, description="encoding sentences")
    a_rows, b_rows = [row[s] for s in sts.sentence1], [row[s] for s in sts.sentence2]

    def correlations(emb: torch.Tensor) -> dict[str, float]:
        cosine = (emb[a_rows] * emb[b_rows]).sum(1)
        try:
            return sts_correlations(cosine.numpy(), sts.scores)
        except ValueError as e:
            raise UserError(f"{sts.name}: {e}") from None

    out = correlations(unit(full))
    by_dim = {d: correlations(truncate(full, d)) for d in dims}
    return {**out, "n_pairs": len(sts.scores), "n_encoded": len(unique), "seconds": time.perf_counter() - start,
            "by_dim": by_dim}


def evaluate_probe(embedder: Embedder, data: RetrievalData | STSData, *, batch_size: int = 64,
                   max_length: int | None = None, query_max_length: int | None = None,
                   cpu_bf16: bool = False) -> dict[str, float]:
    """The headline numbers of a general-domain probe, headline first: STS Spearman and Pearson, or retrieval
    nDCG@10, MRR@10 and Recall@100. No progress bar and no cache: train.py calls it on a changing model."""
    if isinstance(data, STSData):
        out = evaluate_sts(embedder, data, batch_size=batch_size, max_length=max_length, cpu_bf16=cpu_bf16,
                           show_progress=False)
        return {"spearman": out["spearman"], "pearson": out["pearson"]}
    summary = evaluate_retrieval(embedder, data, ks=(10, 100), batch_size=batch_size, max_length=max_length,
                                 query_max_length=query_max_length, cpu_bf16=cpu_bf16,
                                 show_progress=False).metrics.summary
    return {k: summary[k] for k in ("ndcg@10", "mrr@10", "recall@100")}


def evaluate_classification(embedder: Embedder, data: ClassificationData, reference: ClassificationData | None = None,
                            *, folds: int = 5, seed: int = 0, head: ClassifierHead | None = None, batch_size: int = 64,
                            max_length: int | None = None, cpu_bf16: bool = False,
                            show_progress: bool | None = None) -> dict[str, float]:
    """kNN (k = KNN_K, cosine) and linear-probe (logistic regression) accuracy and macro-F1 of `data`'s rows, the
    classifiers fitted on `reference`'s embeddings; without a reference, by `folds`-fold cross-validation over
    `data` (rows dealt to folds label by label, by seed). With a trained `head`, its accuracy and macro-F1 too.
    Texts get no instruction. Also returns n_rows and seconds."""
    start = time.perf_counter()
    ref = reference or data
    names = sorted(set(ref.labels) | set(data.labels))
    ids = {name: i for i, name in enumerate(names)}
    texts = list(dict.fromkeys(ref.texts + data.texts))
    row = {t: i for i, t in enumerate(texts)}
    emb = embedder.encode(texts, batch_size=batch_size, max_length=max_length, as_numpy=False, cpu_bf16=cpu_bf16,
                          show_progress=show_progress, description="encoding texts")
    x_ref, y_ref = emb[[row[t] for t in ref.texts]], [ids[l] for l in ref.labels]
    x, gold = emb[[row[t] for t in data.texts]], [ids[l] for l in data.labels]
    if reference is not None:
        parts = [(list(range(len(ref.texts))), list(range(len(data.texts))))]
    else:
        fold = cross_validation_folds(data.labels, folds, seed)
        parts = [([i for i in range(len(gold)) if fold[i] != f], [i for i in range(len(gold)) if fold[i] == f])
                 for f in range(folds)]
    knn, probe = [0] * len(gold), [0] * len(gold)
    for fit, held in parts:
        if not held:
            continue
        if len({y_ref[i] for i in fit}) < 2:
            raise UserError(f"{ref.name or 'the reference rows'}: a classifier needs rows of at least 2 labels")
        xf, yf = x_ref[fit], [y_ref[i] for i in fit]
        for i, k, p in zip(held, knn_predict(xf, yf, x[held], KNN_K), linear_probe_predict(xf, yf, x[held], len(names))):
            knn[i], probe[i] = int(k), int(p)
    out = {f"knn_{k}": v for k, v in classification_scores(knn, gold).items()}
    out |= {f"probe_{k}": v for k, v in classification_scores(probe, gold).items()}
    if head is not None:
        predicted = head.predict(x)
        out |= {f"head_{k}": v for k, v in classification_scores(predicted, data.labels).items()}
    return {**out, "n_rows": len(gold), "seconds": time.perf_counter() - start}


@dataclass
class ClassifierHead:
    """A linear classification head on the pooled embedding: logits = emb @ weight.T + bias, one row per label."""

    weight: torch.Tensor  # (n_labels, dim)
    bias: torch.Tensor  # (n_labels,)
    labels: list[str]

    def predict(self, emb: torch.Tensor) -> list[str]:
        """The label of each row."""
        idx = (emb.float() @ self.weight.float().cpu().T + self.bias.float().cpu()).argmax(1)
        return [self.labels[i] for i in idx.tolist()]

    def save(self, folder: str | Path) -> Path:
        """classifier_head.safetensors (weight, bias; the labels in its metadata) beside an exported model; an
        extra file that transformers and sentence-transformers ignore."""
        path = Path(folder) / HEAD_FILE
        save_file({"weight": self.weight.detach().float().cpu().contiguous(),
                   "bias": self.bias.detach().float().cpu().contiguous()}, str(path),
                  metadata={"labels": json.dumps(self.labels, ensure_ascii=False)})
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "ClassifierHead":
        """The head saved in `folder`."""
        path = Path(folder) / HEAD_FILE
        with safe_open(str(path), "pt") as f:
            labels = json.loads(f.metadata()["labels"])
            return cls(f.get_tensor("weight"), f.get_tensor("bias"), labels)


HEAD_FILE = "classifier_head.safetensors"


def cross_validation_folds(labels: list[str], folds: int, seed: int) -> list[int]:
    """The fold of each row: each label's rows shuffled by seed and dealt round-robin, so folds keep the label mix."""
    if folds < 2:
        raise UserError(f"cross-validation needs at least 2 folds, got {folds}")
    fold = [0] * len(labels)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    offset = 0
    for label in sorted(by_label):
        rows = by_label[label]
        random.Random(f"{seed}/{label}").shuffle(rows)
        for j, i in enumerate(rows):
            fold[i] = (offset + j) % folds
        offset += len(rows)  # the next label starts where this one stopped, so fold sizes stay even
    return fold
