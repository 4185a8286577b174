"""From examples to training batches: the held-out split, the deterministic sampler and batch assembly.

Everything random here is a pure function of (seed, epoch, example index), so a run resumed at micro-step m
sees exactly the batches an uninterrupted run would: the sampler's whole state is one integer.
"""
from __future__ import annotations

import hashlib
import math
import queue
import random
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch

from bge.data import Example, normalise


def text_hash(text: str) -> int:
    """A stable non-negative 63-bit hash of the normalised text (the same across processes and runs)."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode(), digest_size=8).digest(), "little") >> 1


# ---- the held-out split ------------------------------------------------------------------------------
def split_queries(examples: list[Example], val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[int]]:
    """Indices of examples for train/val/test, drawn by seed. Queries that share a positive passage (or the
    same query text) form one group and stay in one split, so no test positive is ever trained on as a positive."""
    # ~ keeps query and passage keys apart
    return split_by_keys([{text_hash(t) for t in ex.pos} | {~text_hash(ex.query)} for ex in examples],
                         val_ratio, test_ratio, seed)


def split_by_keys(keys: list[set[int]], val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[int]]:
    """Indices of items for train/val/test, drawn by seed. Items that share a key (transitively) form one group and
    stay in one split; groups are shuffled and dealt to test, then val, until each holds its share of the items."""
    if val_ratio < 0 or test_ratio < 0 or val_ratio + test_ratio >= 1:
        raise ValueError(f"val_ratio + test_ratio must be in [0, 1), got {val_ratio} + {test_ratio}")
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[int, int] = {}
    for i, ks in enumerate(keys):
        for h in ks:
            parent[find(i)] = find(first_seen.setdefault(h, i))
    groups = defaultdict(list)
    for i in range(len(keys)):
        groups[find(i)].append(i)
    order = sorted(groups.values())
    random.Random(seed).shuffle(order)
    n = len(keys)
    want = {"test": round(test_ratio * n), "val": round(val_ratio * n)}
    out = {"train": [], "val": [], "test": []}
    for g in order:
        name = next((s for s in ("test", "val") if len(out[s]) < want[s]), "train")
        out[name] += g
    return {k: sorted(v) for k, v in out.items()}


# ---- the sampler -------------------------------------------------------------------------------------
class Sampler:
    """Batches of example indices: a fresh shuffle each epoch, and never the same query twice in a batch."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int | str, min_size: int = 1,
                 per_epoch: int | None = None):
        self.batch_size, self.seed, self.min_size = batch_size, seed, min_size  # min_size: one query per rank
        self.per_epoch = per_epoch  # take only the first per_epoch of each epoch's shuffle (a large unlabeled pool)
        self.query_hash = [text_hash(ex.query) for ex in examples]
        self._epoch, self._batches = -1, []
        self._lengths: dict[int, int] = {}

    def __len__(self) -> int:
        """Batches in the first epoch (later ones differ only when repeated queries force an extra batch)."""
        return self.epoch_length(0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch, in order. A query whose text is already in the open batch waits and
        goes into the next batch that does not hold it yet."""
        if epoch == self._epoch:
            return self._batches
        order = list(range(len(self.query_hash)))
        random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)
        order = order[: self.per_epoch]
        batches, batch, seen, waiting = [], [], set(), []
        for i in order + [None]:  # None: the end, after which only waiting queries are left
            if i is not None and self.query_hash[i] in seen:
                waiting.append(i)
            elif i is not None:
                batch.append(i)
                seen.add(self.query_hash[i])
            while len(batch) == self.batch_size or (i is None and (batch or waiting)):
                batches.append(batch)
                batch, seen, still = [], set(), []
                for w in waiting:  # waiting queries go first into the next batch
                    if len(batch) < self.batch_size and self.query_hash[w] not in seen:
                        batch.append(w)
                        seen.add(self.query_hash[w])
                    else:
                        still.append(w)
                waiting = still
                if i is None and not waiting:
                    break
        if batch:
            batches.append(batch)
        batches = [b for b in batches if len(b) >= self.min_size]  # only a short tail can be dropped
        self._epoch, self._batches = epoch, batches
        self._lengths[epoch] = len(batches)
        return batches

    def epoch_length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self.epoch_batches(epoch)
        return self._lengths[epoch]

    def batch(self, micro_step: int) -> tuple[int, list[int]]:
        """(epoch, example indices) of the micro_step-th batch of the run."""
        epoch = 0
        while micro_step >= self.epoch_length(epoch):
            micro_step -= self.epoch_length(epoch)
            epoch += 1
        return epoch, self.epoch_batches(epoch)[micro_step]


# ---- batch assembly ----------------------------------------------------------------------------------
@dataclass
class Batch:
    """B queries and the P passages they brought, in the layout bge.loss expects."""

    queries: list[str]
    prompts: list[str | None]  # per-line instruction, None = the model's default
    passages: list[str]
    pos_index: torch.Tensor  # (B,) each query's positive among the passages
    owner: torch.Tensor  # (P,) which query brought each passage
    passage_hashes: torch.Tensor  # (P,) text hashes, for the false-negative mask
    query_pos_hashes: torch.Tensor  # (B, K) hashes of each query's positives, padded with -1
    teacher_scores: torch.Tensor | None = None  # (P,) teacher scores when every line has them
    instructed: list[bool] | None = None  # (P,) passages that get their query's instruction (symmetric lines)

    def query_texts(self, default_prompt: str) -> list[str]:
        """Queries with their instruction prefixed."""
        return [(default_prompt if p is None else p) + q for q, p in zip(self.queries, self.prompts)]

    def passage_texts(self, default_prompt: str, passage_prompt: str) -> list[str]:
        """Passages as the encoder sees them: a symmetric line's with its query's instruction prefixed (both sides
        of an STS pair are alike), every other with the passage instruction."""
        if not self.instructed or not any(self.instructed):
            return [passage_prompt + t for t in self.passages]
        q = [(default_prompt if p is None else p) for p in self.prompts]
        return [q[o] + t if sym else passage_prompt + t
                for t, o, sym in zip(self.passages, self.owner.tolist(), self.instructed)]


SYMMETRIC = ("symmetric_sts", "symmetric_clustering")  # FlagEmbedding puts the query instruction on these passages


def line_group_size(ex: Example, group_size: int) -> int:
    """Passages a line brings, as FlagEmbedding sizes its groups by `type`: only_1neg lines bring their positive and
    one negative, symmetric_class lines at most the negatives they have (not repeated); others group_size."""
    if ex.kind == "only_1neg":
        return 2
    if ex.kind == "symmetric_class":
        return min(group_size, len(ex.neg) + 1)
    return group_size


def make_batch(examples: list[Example], indices: list[int], *, group_size: int, seed: int, epoch: int,
               positives: list[int] | None = None) -> Batch:
    """For each example: one positive drawn from `pos` (or the one `positives` names: every (query, positive) pair
    an item of its own) and (line_group_size - 1) negatives drawn from `neg` (repeated when there are too few, as
    FlagEmbedding does; none when the line has none: in-batch negatives only)."""
    queries, prompts, passages, pos_index, owner, scores = [], [], [], [], [], []
    pos_hashes, instructed = [], []
    for b, i in enumerate(indices):
        ex = examples[i]
        if positives is None:
            rng = random.Random(f"{seed}/{epoch}/{i}")
            j = rng.randrange(len(ex.pos))
        else:
            j = positives[b]
            rng = random.Random(f"{seed}/{epoch}/{i}/{j}")
        negs, size = [], line_group_size(ex, group_size)
        if ex.neg and size > 1:
            pool = list(range(len(ex.neg))) * math.ceil((size - 1) / len(ex.neg))
            negs = rng.sample(pool, size - 1)
        queries.append(ex.query)
        prompts.append(ex.prompt)
        pos_index.append(len(passages))
        passages += [ex.pos[j]] + [ex.neg[k] for k in negs]
        owner += [b] * (1 + len(negs))
        instructed += [ex.kind in SYMMETRIC] * (1 + len(negs))
        if ex.pos_scores is not None and ex.neg_scores is not None:
            scores += [ex.pos_scores[j]] + [ex.neg_scores[k] for k in negs]
        pos_hashes.append(sorted({text_hash(t) for t in ex.pos}))
    width = max(len(h) for h in pos_hashes)
    return Batch(
        queries, prompts, passages,
        pos_index=torch.tensor(pos_index),
        owner=torch.tensor(owner),
        passage_hashes=torch.tensor([text_hash(t) for t in passages]),
        query_pos_hashes=torch.tensor([h + [-1] * (width - len(h)) for h in pos_hashes]),
        teacher_scores=torch.tensor(scores) if len(scores) == len(passages) else None,
        instructed=instructed,
    )


# ---- off the critical path ---------------------------------------------------------------------------
T = TypeVar("T")


class Prefetcher(Generic[T]):
    """Builds micro-batch m+1, m+2 (sampling, tokenisation) in a background thread while step m runs.
    `build` must be a pure function of the micro-step, so what is prefetched is what would have been built."""

    def __init__(self, build: Callable[[int], T], start: int, depth: int = 2):
        self._build, self._depth = build, depth
        self._start(start)

    def _start(self, m: int) -> None:
        self._queue: queue.Queue = queue.Queue(self._depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._build, m, self._queue, self._closed), daemon=True)
        self._thread.start()

    def restart(self, m: int) -> None:
        """Drop what was built ahead and build again from micro-step m: what `build` reads has changed (--remine's
        negatives)."""
        self._closed.set()
        while self._thread.is_alive():  # unblock a put on a full queue until the thread sees the flag
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._start(m)

    @staticmethod
    def _run(build: Callable[[int], T], m: int, out: queue.Queue, closed: threading.Event) -> None:
        while not closed.is_set():
            try:
                item = build(m)
            except BaseException as e:  # hand the error to the training thread, which raises it
                item = e
            out.put((m, item))
            m += 1

    def get(self, m: int) -> T:
        got, item = self._queue.get()
        assert got == m, f"prefetched micro-step {got}, expected {m}"
        if isinstance(item, BaseException):
            raise item
        return item
