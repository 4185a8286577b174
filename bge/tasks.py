"""Task types: how a training micro-batch is built and which loss applies, how the task validates, and its test.

    retrieval       query/pos/neg lines: InfoNCE over the positive, hard negatives and in-batch negatives;
                    validated by nDCG@10 on held-out queries
    sts             scored pairs: CoSENT (or cosine-MSE) on each pair's cosine; validated by Spearman
    classification  text/label rows: a row's positive is another row of its label; every text of another label in
                    the batch is a negative and the other texts of its own label are masked (bge.loss.label_mask);
                    optionally a linear head with cross-entropy. Validated by kNN and linear-probe accuracy and
                    macro-F1, fitted on the training rows
Two tasks are training signal only (never tested or reported): --unlabeled's pseudo-pairs (UnlabeledTask), and
--distill-corpus's teacher embeddings of unlabeled text (CorpusTask), a stage whose micro-batches all come first.
A file may mix them: TaskSampler draws each micro-batch from one task, as FlagEmbedding draws each batch from one
dataset. train.py runs one loop; per micro-batch it asks the task for (token-id groups, loss function).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bge import card, distributed
from bge.batching import Batch, Sampler, make_batch, split_by_keys, split_queries, text_hash
from bge.checkpoint import atomic_write_text
from bge.config import TrainConfig, mined_negatives
from bge.console import console
from bge.data import (ClassificationData, Example, Labelled, Pair, RetrievalData, Source, STSData, data_sources,
                      load_eval_data, read_training_data)
from bge.diagnostics import Comparison, compare
from bge.embedder import Embedder
from bge.errors import UserError
from bge.evaluation import (HEAD_FILE, ClassifierHead, CorpusCache, evaluate_classification, evaluate_probe,
                            evaluate_retrieval, evaluate_sts)
from bge.loss import (LossFn, cosent, cosine_mse, distill_loss, false_negative_mask, head_cross_entropy, info_nce,
                      label_mask, pair_order_accuracy, teacher_score_kl)
from bge.mine import mine, parse_margin, parse_range
from bge.optim import default_lr
from bge.tokenizer import Tokenizer
from bge.unlabeled import KINDS, MIN_WORDS, piece, pseudo_pairs, read_passages, sentences, unique

VAL_KS = (1, 10, 100)
TEST_KS = (1, 3, 5, 10, 100)


@dataclass
class TestResult:
    """A task's test metrics for the base and the fine-tuned model, and (retrieval) the diagnostics comparing them."""

    title: str
    base: dict[str, float]
    fine_tuned: dict[str, float]
    counts: dict[str, int]  # what was scored: test_queries / test_corpus, test_pairs, test_rows
    comparison: Comparison | None = None


class Task:
    """One task of a run: its training items and held-out sets. Subclasses define the batch, the loss and the metrics."""

    name = ""
    metric = ""  # the validation metric that chooses best/
    metric_label = ""
    table_metrics: tuple[str, ...] = ()  # rows of the ending's table
    labelled = True  # False: training signal only (pseudo-pairs), never tested or reported, never chooses best/
    stage = False  # True: every micro-batch of this task comes before any other task's (TaskSampler)
    per_epoch: int | None = None  # items drawn per epoch (None: all of them)

    def __init__(self, train: list, val, test, cfg: TrainConfig):
        self.train, self.val, self.test_data, self.cfg = train, val, test, cfg
        self.notes: list[str] = []  # one-line remarks train.py prints once
        self.no_in_batch_files: set[int] = set()  # --data sources named *no_in_batch_neg (load_tasks sets them)

    def anchors(self) -> list[str]:
        """One text per sampled item; the sampler never puts the same one twice in a batch."""
        raise NotImplementedError

    def anchor_files(self) -> list[int]:
        """The --data source of each anchor (parallel to anchors()): TaskSampler draws each micro-batch from one."""
        return [0] * len(self.anchors())

    def micro_batch(self, indices: list[int], epoch: int, tokenizer: Tokenizer, device: torch.device,
                    info: distributed.DistInfo | None = None) -> tuple[dict[str, list[list[int]]], LossFn]:
        """The token-id groups of the sampled items (this rank's share of them) and the loss over their embeddings.
        A pure function of its arguments (train.py builds batches ahead in a thread), so tensors reach `device` only
        inside the loss. `info` (retrieval under torchrun) puts every rank's passages into each query's softmax."""
        raise NotImplementedError

    def validate(self, embedder: Embedder, cpu_bf16: bool) -> dict[str, float]:
        raise NotImplementedError

    def test(self, base: Embedder, tuned: Embedder, cpu_bf16: bool, best_dir: Path) -> TestResult:
        """Base and fine-tuned (best/, loaded as `tuned`) on the held-out test set."""
        raise NotImplementedError

    def test_scores(self, model: Embedder, cpu_bf16: bool, folder: Path) -> dict[str, float]:
        """One model's test metrics, as test() reports the fine-tuned one's (for a base/fine-tuned mix, say);
        `folder` is where the model was exported (a classification head beside it is used)."""
        raise NotImplementedError

    def describe(self) -> str:
        n = lambda d: 0 if d is None else self.size(d)
        return f"{self.name}: {len(self.train)} training, {n(self.val)} validation, {n(self.test_data)} test"

    @staticmethod
    def size(d) -> int:
        return len(d.queries) if isinstance(d, RetrievalData) else len(d.scores) if isinstance(d, STSData) else len(d.texts)


# ---- retrieval -------------------------------------------------------------------------------------------
def retrieval_loss(emb: dict[str, torch.Tensor], batch: Batch, cfg: TrainConfig,
                   info: distributed.DistInfo | None = None, in_batch: bool = True) -> tuple[torch.Tensor, dict]:
    """InfoNCE of a batch's queries over its passages, false negatives masked; with `info`, over every
    rank's passages (cross-device negatives, weighted so DDP's average is the global mean). in_batch=False (a
    *no_in_batch_neg file) or --no-in-batch-negatives: each query scores its own group only."""
    q, p, pos, owner, hashes = emb["q"], emb["p"], batch.pos_index, batch.owner, batch.passage_hashes
    offset, weight = 0, 1.0
    if info is not None:
        p, pos, owner, hashes, offset, weight = distributed.cross_device_batch(q, p, batch, info)
    dev = q.device
    mask = false_negative_mask(hashes.to(dev), batch.query_pos_hashes.to(dev), pos.to(dev))
    loss, acc = info_nce(q, p, pos.to(dev), cfg.temperature, mask=mask, owner=owner.to(dev),
                         in_batch=cfg.in_batch_negatives and in_batch, symmetric=cfg.symmetric, query_offset=offset)
    return loss * weight, {"acc": acc}


class RetrievalTask(Task):
    name, metric, metric_label = "retrieval", "ndcg@10", "nDCG@10"
    table_metrics = ("ndcg@10", "mrr@10", "recall@10", "recall@100")

    def __init__(self, train: list[Example], val, test, cfg: TrainConfig):
        super().__init__(train, val, test, cfg)
        self.teacher = None  # bge.distill.Teacher with --distill-from: its embeddings are targets too
        self.full: RetrievalData | None = None  # the whole evaluation set of --data (load_tasks sets it)
        self.extra_sets: dict[int, RetrievalData] = {}  # --extra-data source -> its own set (load_tasks sets them)
        self.mined: list[tuple[RetrievalData, list[int]]] = []  # what mine_negatives mined (mining_groups)
        # one memory for validation and test: the base model validated at step 0 and best/ validated at its step are
        # tested without encoding the corpus again; only the test writes the on-disk cache
        self.cache = CorpusCache(cache_folder(cfg))
        self.group_size = cfg.group_size if any(ex.neg for ex in train) else 1
        if self.group_size != cfg.group_size and not mined_negatives(cfg):  # (mining fills them before training)
            self.notes.append("no hard negatives in the data: training with in-batch negatives only")
        # what the sampler draws: queries (each brings one positive drawn per epoch), or every (query, positive) pair
        self.items = ([(i, j) for i, ex in enumerate(train) for j in range(len(ex.pos))] if cfg.positives == "all"
                      else [(i, None) for i in range(len(train))])
        for label, d in (("validation", val), ("test", test)):
            if isinstance(d, RetrievalData) and d.n_merged:
                self.notes.append(d.merged_note(label))
        kinds = Counter(ex.kind for ex in train if ex.kind not in ("", "normal"))
        if kinds:  # FlagEmbedding's types, followed; and the one place bge differs from it
            self.notes.append("FlagEmbedding types: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) +
                              " line(s). only_1neg: one hard negative; symmetric_class: at most the negatives a line has"
                              "; symmetric_sts/_clustering: the query instruction on passages too (the evaluation "
                              "corpus is encoded without it)")

    def anchors(self) -> list[str]:
        return [self.train[i].query for i, _ in self.items]

    def anchor_files(self) -> list[int]:
        return [self.train[i].file or 0 for i, _ in self.items]

    def mining_groups(self) -> list[tuple[RetrievalData, list[int]]]:
        """What --mine-negatives mines: (retrieval set, training rows) for --data's queries against the run's corpus
        and for each --extra-data source's against its own passages, leaving out a group whose lines bring negatives
        (its own are kept). [] when nothing is mined."""
        if not mined_negatives(self.cfg):
            return []
        rows: dict[int | None, list[int]] = {}
        for i, ex in enumerate(self.train):
            rows.setdefault(ex.file if ex.file in self.extra_sets else None, []).append(i)
        return [(self.full if k is None else self.extra_sets[k], r) for k, r in rows.items()
                if not any(self.train[i].neg for i in r)]

    def bare_note(self) -> str | None:
        """A warning when some training queries, but not all, are left without hard negatives: a file whose lines
        bring negatives is not mined, so its lines without any train against in-batch negatives alone."""
        bare = sum(not ex.neg for ex in self.train)
        if not 0 < bare < len(self.train) or self.group_size == 1:
            return None
        why = "a file whose lines bring some is not mined" if mined_negatives(self.cfg) else "--mine-negatives 0"
        return (f"[yellow]{bare:,} of {len(self.train):,} training queries have no hard negatives[/]: their lines "
                f"bring none, and {why}; they train against in-batch negatives only (python -m bge.mine writes a file "
                f"with mined negatives on every line)")

    def mine_negatives(self, base: Embedder, cpu_bf16: bool) -> None:
        """Fill the training queries' `neg` with --mine-negatives passages mined by the base model from the run's
        corpus (bge.mine: ranks --mine-range, the --mine-margin filter); an --extra-data source's queries from its own.
        Only training queries are mined; the base model's corpus embeddings go to the task's memory, where step-0
        validation and the base's test find them. The negatives are kept in the cache folder, keyed by everything
        they depend on."""
        cfg = self.cfg
        count = mined_negatives(cfg)
        self.mined = self.mining_groups()  # fixed now: the filled rows have negatives from here on
        rows = [i for _, r in self.mined for i in r]
        sets = [d.fingerprint() for d, _ in self.mined]
        # the instructions are in the key because the base encodes the queries and passages with them; the
        # fingerprint leaves them out (an empty one adds nothing, so older keys stay valid; so does a run of --data
        # alone, whose one set is keyed as it always was, and --mine-with's default)
        key = json.dumps([sets[0] if len(sets) == 1 else sets, base.fingerprint(), [self.train[i].qid for i in rows],
                          count, cfg.mine_range, cfg.mine_margin, cfg.seed, cfg.max_passage_length,
                          cfg.max_query_length, cpu_bf16, MINE_FORMAT]
                         + ([base.tokenizer.query_prompt] if base.tokenizer.query_prompt else [])
                         + ([{"passage_prompt": base.tokenizer.passage_prompt}] if base.tokenizer.passage_prompt else [])
                         + ([cfg.mine_with] if cfg.mine_with != "model" else []))
        path = cache_folder(cfg) / f"mined-{hashlib.blake2b(key.encode(), digest_size=16).hexdigest()}.json"
        cached = _read_mined(path, len(rows))
        if cached is None:
            lines, report = self._mine(base, cpu_bf16)
            cached = {"negatives": [line["neg"] for line in lines], "report": report}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(cached, ensure_ascii=False) + "\n")
        for i, neg in zip(rows, cached["negatives"]):
            self.train[i].neg = neg
        r = cached["report"]
        self.group_size = cfg.group_size
        how = {"model": "with the base model", "bm25": "ranked by BM25, filtered by the base model",
               "hybrid": "ranked by BM25 and the base model fused, filtered by the base model"}[cfg.mine_with]
        self.notes.append(f"mined {r['written']:,} hard negatives for {r['queries']:,} training queries {how} "
                          f"(ranks {cfg.mine_range}, margin {cfg.mine_margin}; {r['removed']['margin']:,} "
                          f"likely positives dropped); --group-size {cfg.group_size} draws {cfg.group_size - 1} per query"
                          + ("; --mine-negatives 0 trains without them" if cfg.mine_negatives < 0 else "")
                          + ("; --remine mines them again at each epoch's end" if cfg.remine else ""))

    def _mine(self, model: Embedder, cpu_bf16: bool) -> tuple[list[dict], dict]:
        """bge.mine over each group of self.mined: the lines in the order of its rows, and one report summed."""
        cfg = self.cfg
        lines, reports = [], []
        for data, rows in self.mined:
            got, report = mine(model, data, [self.train[i] for i in rows], negatives=mined_negatives(cfg),
                               rank_range=parse_range(cfg.mine_range), margin=parse_margin(cfg.mine_margin),
                               seed=cfg.seed, batch_size=cfg.eval_batch_size, max_length=cfg.max_passage_length,
                               query_max_length=cfg.max_query_length, cache_dir=self.cache.view(write=False),
                               cpu_bf16=cpu_bf16, retriever=cfg.mine_with, show_progress=False)
            lines += got
            reports.append(report)
        return lines, summed(reports)

    def remine(self, model: Embedder, cpu_bf16: bool) -> list[list[str]]:
        """--remine: each mined training query's negatives mined again, by the same rule, with the model being
        trained (ANCE's refresh: the base model's negatives grow easy as the model learns them). Its corpus embeddings
        are the validation's, still in the task's memory. Returns the passage ids (each from its group's set), which
        the training state keeps."""
        lines, _ = self._mine(model, cpu_bf16)
        ids = [line["mined"]["ids"] for line in lines]
        self.use_negatives(ids)
        return ids

    def use_negatives(self, ids: list[list[str]]) -> None:
        """Negatives by corpus id, as remine returned them (a resumed run's, or rank 0's under torchrun)."""
        texts = [(data.corpus, i) for data, rows in self.mined for i in rows]
        for (corpus, i), row in zip(texts, ids, strict=True):
            self.train[i].neg = [corpus[d] for d in row]

    def micro_batch(self, indices, epoch, tokenizer, device, info=None):
        cfg = self.cfg
        picked = [self.items[k] for k in indices]
        batch = make_batch(self.train, [i for i, _ in picked], group_size=self.group_size, seed=cfg.seed, epoch=epoch,
                           positives=None if cfg.positives == "one" else [j for _, j in picked])
        prompt = tokenizer.query_prompt
        inputs = {"q": tokenizer.tokenize(batch.query_texts(prompt), max_length=cfg.max_query_length),
                  "p": tokenizer.tokenize(batch.passage_texts(prompt, tokenizer.passage_prompt),
                                          max_length=cfg.max_passage_length)}
        teacher = self.teacher
        in_batch = (self.train[picked[0][0]].file or 0) not in self.no_in_batch_files  # a batch is of one file

        def loss_fn(emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            loss, stats = retrieval_loss(emb, batch, cfg, info, in_batch=in_batch)
            if teacher is not None:
                loss = cfg.contrastive_weight * loss + teacher_terms(emb, batch, teacher, cfg)
            if cfg.kd_weight > 0:  # towards the teacher's scores over each query's own group (FlagEmbedding's KD)
                dev = emb["q"].device
                loss = loss + cfg.kd_weight * teacher_score_kl(emb["q"], emb["p"], batch.owner.to(dev),
                                                               batch.teacher_scores.to(dev), cfg.temperature,
                                                               cfg.kd_temperature)
            return loss, stats

        return inputs, loss_fn

    def validate(self, embedder, cpu_bf16):
        ev = evaluate_retrieval(embedder, self.val, ks=VAL_KS, batch_size=self.cfg.eval_batch_size,
                                max_length=self.cfg.max_passage_length, query_max_length=self.cfg.max_query_length,
                                cpu_bf16=cpu_bf16, show_progress=False, cache_dir=self.cache.view(write=False))
        return ev.metrics.summary

    def _test(self, model: Embedder, cpu_bf16: bool):
        return evaluate_retrieval(model, self.test_data, ks=TEST_KS, batch_size=self.cfg.eval_batch_size,
                                  max_length=self.cfg.max_passage_length, query_max_length=self.cfg.max_query_length,
                                  cpu_bf16=cpu_bf16, cache_dir=self.cache)

    def test_scores(self, model, cpu_bf16, folder):
        return self._test(model, cpu_bf16).metrics.summary

    def test(self, base, tuned, cpu_bf16, best_dir):
        b, t = (self._test(m, cpu_bf16) for m in (base, tuned))
        comparison = None
        if self.cfg.explain > 0:
            comparison = compare(("base", "fine-tuned"), (b.metrics.per_query, t.metrics.per_query),
                                 (b.ranking.ranked, t.ranking.ranked), self.test_data.qrels, self.test_data.queries,
                                 n=self.cfg.explain, precision=self.cfg.threshold_precision)
        d = self.test_data
        return TestResult(f"held-out test: {len(d.queries)} queries, {len(d.corpus)} passages", b.metrics.summary,
                          t.metrics.summary, {"test_queries": b.metrics.n_scored, "test_corpus": len(d.corpus),
                                              "test_passages_encoded": b.ranking.n_encoded + t.ranking.n_encoded},
                          comparison)


def teacher_terms(emb: dict[str, torch.Tensor], batch: Batch, teacher, cfg: TrainConfig) -> torch.Tensor:
    """The distillation terms (bge.loss.distill_loss) of a batch's embeddings against the teacher's (a
    bge.distill.Teacher) embeddings of the same texts, false negatives masked in the KL term. Called inside the loss,
    on the training thread: the teacher is a model too."""
    dev = emb["q"].device
    target = teacher.embed(batch, dev)
    mask = false_negative_mask(batch.passage_hashes, batch.query_pos_hashes, batch.pos_index).to(dev)
    return distill_loss(emb, target, kind=cfg.distill_loss, weight=cfg.distill_weight, kl_weight=cfg.distill_kl,
                        temperature=cfg.distill_temperature, mask=mask)


def forget_validated(tasks: dict[str, Task], embedder: Embedder) -> None:
    """The model just validated did not become best/, so no test will need its corpus embeddings: drop them from
    the memory, which holds a few models only, so that best/'s are still there at the test (a 3-epoch run whose
    best is epoch 1 would otherwise encode the corpus once more)."""
    if "retrieval" in tasks:
        tasks["retrieval"].cache.forget(embedder.fingerprint())


def cache_folder(cfg: TrainConfig) -> Path:
    """--cache-dir, else <out-dir>/cache."""
    return Path(cfg.cache_dir or Path(cfg.out_dir) / "cache")


MINE_FORMAT = 1  # bump when what a mined-negatives cache file holds changes


def summed(reports: list[dict]) -> dict:
    """bge.mine's reports of several groups as one: counts added up, settings from the first."""
    out = dict(reports[0])
    for r in reports[1:]:
        for k in ("queries", "corpus", "candidates", "kept", "written", "queries_short", "encoded", "cached"):
            out[k] += r[k]
        out["removed"] = {f: n + r["removed"][f] for f, n in out["removed"].items()}
    return out


def _read_mined(path: Path, n: int) -> dict | None:
    """A cached mining result for n training queries, or None (absent or damaged: mine again)."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached if len(cached["negatives"]) == n and "report" in cached else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


class UnlabeledTask(RetrievalTask):
    """Pseudo-pairs from the corpus's own passages (bge.unlabeled): retrieval's batches and loss, in-batch negatives,
    `per_epoch` pairs drawn afresh each epoch; no held-out set (it is training signal, not a task to report)."""

    name, labelled = "unlabeled", False

    def __init__(self, train: list[Example], cfg: TrainConfig, per_epoch: int):
        super().__init__(train, None, None, cfg)
        self.per_epoch, self.notes = min(per_epoch, len(train)), []
        self.stage = cfg.unlabeled_stage  # all its batches first (TaskSampler), one pass of per_epoch pairs

    def describe(self) -> str:
        when = "as a first stage" if self.stage else "per epoch"
        return f"unlabeled: {self.per_epoch} of {len(self.train)} pseudo-pairs {when}"


# ---- --distill-corpus: the teacher's embeddings of unlabeled text, a stage before the labelled data ---------------
@dataclass
class CorpusPassage:
    """A passage of the --distill-corpus stage: the text the student embeds, the body pieces are cut from, and the
    body's sentences long enough to be a pseudo-query."""

    text: str  # as the evaluation corpus holds it: (title + ' ' + body).strip() with --title
    body: str
    usable: list[str] = field(default_factory=list)


class CorpusTask(Task):
    """The student learns the teacher's embeddings and in-batch similarities (bge.loss.distill_loss; no contrastive
    term: the teacher is the only target, so any text will do) on (pseudo-query, passage) pairs: each corpus passage
    with a sentence or random-length span cut from it afresh each epoch (bge.unlabeled.piece), and each training query
    with one of its positives. A stage: TaskSampler draws all its micro-batches before the labelled tasks'. Validated
    by the same loss on held-out passages (never trained on, never a training query's positive), logged as
    val/corpus/distill_loss; it never chooses best/."""

    name, labelled, stage = "corpus", False, True

    def __init__(self, passages: list[CorpusPassage], queries: list[Example], held_out: list[CorpusPassage],
                 cfg: TrainConfig):
        super().__init__([*passages, *queries], None, None, cfg)
        self.n_passages, self.n_queries = len(passages), len(queries)
        self.teacher = None  # bge.distill.Teacher: train.py sets it (--distill-from)
        self.val = [self.example(p, f"held-out/{k}", 0) for k, p in enumerate(held_out)] or None

    def describe(self) -> str:
        return (f"corpus: {self.n_passages} passages (each with a sentence or span cut from it) and {self.n_queries} "
                f"training queries per pass, {len(self.val or [])} passages held out")

    def anchors(self) -> list[str]:
        return [it.text if isinstance(it, CorpusPassage) else it.query for it in self.train]

    def example(self, item: CorpusPassage | Example, k: int | str, epoch: int) -> Example:
        """Item k's pair at this epoch, a pure function of (seed, epoch, k): (piece, passage) or (query, a positive)."""
        rng = random.Random(f"{self.cfg.seed}/corpus/{epoch}/{k}")
        if isinstance(item, CorpusPassage):
            return Example(piece(item.body, item.usable, rng), [item.text])
        return Example(item.query, [rng.choice(item.pos)], prompt=item.prompt)

    def _batch(self, examples: list[Example], epoch: int) -> Batch:
        return make_batch(examples, list(range(len(examples))), group_size=1, seed=self.cfg.seed, epoch=epoch)

    def micro_batch(self, indices, epoch, tokenizer, device, info=None):
        cfg = self.cfg
        batch = self._batch([self.example(self.train[k], k, epoch) for k in indices], epoch)
        inputs = {"q": tokenizer.tokenize(batch.query_texts(tokenizer.query_prompt), max_length=cfg.max_query_length),
                  "p": tokenizer.tokenize(batch.passages, max_length=cfg.max_passage_length, is_passage=True)}
        teacher = self.teacher

        def loss_fn(emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            # acc: how often a piece's nearest passage in the batch is its own (the student's view; not trained on)
            own = (emb["q"] @ emb["p"].T).argmax(1) == torch.arange(len(indices), device=emb["q"].device)
            return teacher_terms(emb, batch, teacher, cfg), {"acc": own.float().mean().detach()}

        return inputs, loss_fn

    def validate(self, embedder, cpu_bf16):
        """The stage's loss on the held-out pairs, in batches of --batch-size as in training (the KL term depends on
        what shares a batch), and the mean cosine between the student's and the teacher's embeddings."""
        cfg, n = self.cfg, len(self.val)
        batch = self._batch(self.val, 0)
        kw = dict(batch_size=cfg.eval_batch_size, as_numpy=False, show_progress=False, cpu_bf16=cpu_bf16)
        student = {"q": embedder.encode(batch.query_texts(embedder.tokenizer.query_prompt),
                                        max_length=cfg.max_query_length, **kw),
                   "p": embedder.encode(batch.passages, max_length=cfg.max_passage_length, is_passage=True, **kw)}
        target = self.teacher.embed(batch, torch.device("cpu"))
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            part = slice(start, start + cfg.batch_size)
            chunk = self._batch(self.val[part], 0)
            loss = teacher_terms({k: v[part] for k, v in student.items()}, chunk, self.teacher, cfg)
            total += float(loss) * len(chunk.queries)
        cos = F.cosine_similarity(torch.cat(list(student.values())), torch.cat(list(target.values())), dim=-1)
        return {"distill_loss": total / n, "cosine": float(cos.mean())}


def corpus_task(cfg: TrainConfig, tasks: dict[str, Task], path: Path | None) -> CorpusTask:
    """The --distill-corpus stage: passages of a BEIR folder's corpus or a passage JSONL ('data': --data's own: a BEIR
    folder's corpus, or every passage of the file's lines and --corpus; of several --data sources (path None), the
    evaluation corpus of them all), less --distill-corpus-val held out (at most a tenth of them); plus the training
    queries."""
    retrieval = tasks.get("retrieval")
    if not cfg.distill_from:
        raise UserError("--distill-corpus trains the student towards a teacher's embeddings: pass --distill-from MODEL")
    if retrieval is None:
        raise UserError("--distill-corpus distils on query/passage pairs; --data has no retrieval lines")
    for name in ("distill_corpus_steps", "distill_corpus_val"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
    source = (path or "--data") if cfg.distill_corpus == "data" else Path(cfg.distill_corpus)
    if cfg.distill_corpus == "data" and (path is None or not path.is_dir()):
        raw = [("", text) for text in retrieval.full.corpus.values()]
    else:
        raw = read_passages(source)
    passages = [CorpusPassage((title + " " + body).strip() if cfg.title else body, body,
                              [s for s in sentences(body) if len(s.split()) >= MIN_WORDS])
                for title, body in unique(raw) if len(body.split()) >= MIN_WORDS]
    positives = {p for ex in retrieval.train for p in ex.pos}
    candidates = [i for i, p in enumerate(passages) if p.text not in positives]
    n_held = min(cfg.distill_corpus_val, len(passages) // 10, len(candidates))  # a small corpus keeps 90% to train on
    held = set(random.Random(f"{cfg.seed}/corpus/held-out").sample(candidates, n_held))
    train = [p for i, p in enumerate(passages) if i not in held]
    if not train:
        raise UserError(f"--distill-corpus {cfg.distill_corpus}: no passage of {MIN_WORDS}+ words left to train on "
                        f"in {source} (--distill-corpus-val {cfg.distill_corpus_val} holds some out)")
    return CorpusTask(train, retrieval.train, [passages[i] for i in sorted(held)], cfg)


# ---- STS / regression --------------------------------------------------------------------------------------
class STSTask(Task):
    name, metric, metric_label = "sts", "spearman", "Spearman"
    table_metrics = ("spearman", "pearson")

    def __init__(self, train: list[Pair], val, test, cfg: TrainConfig):
        super().__init__(train, val, test, cfg)
        scores = [p.score for p in train]
        self.lo, self.hi = min(scores), max(scores)  # cosine-MSE maps the gold range onto [0, 1]
        if cfg.sts_loss == "cosine_mse" and self.hi == self.lo:
            raise UserError(f"{' '.join(cfg.data)}: every training pair has the score {self.lo}; cosine-MSE needs a range")

    def anchors(self) -> list[str]:
        return [p.sentence1 + "\t" + p.sentence2 for p in self.train]

    def anchor_files(self) -> list[int]:
        return [p.file or 0 for p in self.train]

    def micro_batch(self, indices, epoch, tokenizer, device, info=None):
        cfg = self.cfg
        pairs = [self.train[i] for i in indices]
        # symmetric task: no instruction on either side, as evaluate_sts encodes
        inputs = {"a": tokenizer.tokenize([p.sentence1 for p in pairs], max_length=cfg.max_passage_length),
                  "b": tokenizer.tokenize([p.sentence2 for p in pairs], max_length=cfg.max_passage_length)}
        scores = torch.tensor([p.score for p in pairs])

        def loss_fn(emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            cos, gold = F.cosine_similarity(emb["a"], emb["b"], dim=-1), scores.to(device)
            if cfg.sts_loss == "cosent":
                loss = cosent(cos, gold, cfg.cosent_scale)
            else:
                loss = cosine_mse(cos, (gold - self.lo) / (self.hi - self.lo))
            return loss, {"acc": pair_order_accuracy(cos.detach(), gold)}

        return inputs, loss_fn

    def _sts(self, embedder: Embedder, data: STSData, cpu_bf16: bool) -> dict[str, float]:
        r = evaluate_sts(embedder, data, batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_passage_length,
                         cpu_bf16=cpu_bf16, show_progress=False)
        return {"spearman": r["spearman"], "pearson": r["pearson"]}

    def validate(self, embedder, cpu_bf16):
        return self._sts(embedder, self.val, cpu_bf16)

    def test_scores(self, model, cpu_bf16, folder):
        return self._sts(model, self.test_data, cpu_bf16)

    def test(self, base, tuned, cpu_bf16, best_dir):
        n = len(self.test_data.scores)
        return TestResult(f"held-out test: {n} pairs", self.test_scores(base, cpu_bf16, None),
                          self.test_scores(tuned, cpu_bf16, best_dir), {"test_pairs": n})


# ---- classification ----------------------------------------------------------------------------------------
class ClassificationTask(Task):
    name, metric, metric_label = "classification", "knn_macro_f1", "kNN macro-F1"
    table_metrics = ("knn_accuracy", "knn_macro_f1", "probe_accuracy", "probe_macro_f1")

    def __init__(self, train: list[Labelled], val, test, cfg: TrainConfig):
        super().__init__(train, val, test, cfg)
        self.labels = sorted({r.label for r in train})
        self.label_id = {label: i for i, label in enumerate(self.labels)}
        by_label: dict[str, list[int]] = {}
        for i, r in enumerate(train):
            by_label.setdefault(r.label, []).append(i)
        # a row's possible positives: the other rows of its label with another text
        self.partners = [[j for j in by_label[r.label] if train[j].text != r.text] for r in train]
        self.rows = [i for i, p in enumerate(self.partners) if p]  # rows that can anchor a contrastive pair
        lonely = len(train) - len(self.rows)
        if lonely:
            self.notes.append(f"{lonely} classification row(s) have no other row of their label to pair with; "
                              f"they are not used as anchors")
        if len(self.labels) < 2:
            raise UserError(f"{' '.join(cfg.data)}: classification needs at least 2 labels in the training rows, got {self.labels}")
        if not self.rows and cfg.classification_loss != "head":
            raise UserError(f"{' '.join(cfg.data)}: no label has two training rows, so contrastive classification has no pairs")
        self.head: nn.Linear | None = None
        if cfg.classification_loss != "contrastive":
            self.table_metrics += ("head_accuracy", "head_macro_f1")

    def make_head(self, dim: int, device: torch.device) -> nn.Linear:
        """The linear head of --classification-loss head/both: zero-initialised, so it starts from uniform logits."""
        self.head = nn.Linear(dim, len(self.labels)).to(device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        return self.head

    def head_snapshot(self) -> ClassifierHead | None:
        if self.head is None:
            return None
        return ClassifierHead(self.head.weight.detach().cpu().clone(), self.head.bias.detach().cpu().clone(), self.labels)

    def _anchor_rows(self) -> list[int] | range:
        return self.rows if self.cfg.classification_loss != "head" else range(len(self.train))

    def anchors(self) -> list[str]:
        return [self.train[i].text for i in self._anchor_rows()]

    def anchor_files(self) -> list[int]:
        return [self.train[i].file or 0 for i in self._anchor_rows()]

    def micro_batch(self, indices, epoch, tokenizer, device, info=None):
        cfg = self.cfg
        contrastive = cfg.classification_loss != "head"
        anchors = [self.rows[i] if contrastive else i for i in indices]
        label_ids = torch.tensor([self.label_id[self.train[i].label] for i in anchors])
        inputs = {"q": tokenizer.tokenize([self.train[i].text for i in anchors], max_length=cfg.max_passage_length)}
        if contrastive:
            partner = [random.Random(f"{cfg.seed}/{epoch}/{i}").choice(self.partners[i]) for i in anchors]
            inputs["p"] = tokenizer.tokenize([self.train[j].text for j in partner], max_length=cfg.max_passage_length)
            mask = label_mask(label_ids, label_ids, torch.arange(len(anchors)))  # partner j carries anchor j's label
        head = self.head

        def loss_fn(emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            loss, stats, labels = emb["q"].new_zeros(()), {}, label_ids.to(device)
            if contrastive:
                loss, stats["acc"] = info_nce(emb["q"], emb["p"], torch.arange(len(labels), device=device),
                                              cfg.temperature, mask=mask.to(device), symmetric=cfg.symmetric)
            if head is not None:
                texts = torch.cat([emb["q"], emb["p"]]) if contrastive else emb["q"]
                ce, stats["head_acc"] = head_cross_entropy(texts, head.weight, head.bias,
                                                           labels.repeat(len(texts) // len(labels)))
                loss = loss + ce
                stats.setdefault("acc", stats["head_acc"])
            return loss, stats

        return inputs, loss_fn

    def _scores(self, embedder: Embedder, data: ClassificationData, head: ClassifierHead | None,
                cpu_bf16: bool) -> dict[str, float]:
        r = evaluate_classification(embedder, data, ClassificationData.of(self.train), seed=self.cfg.seed, head=head,
                                    batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_passage_length,
                                    cpu_bf16=cpu_bf16, show_progress=False)
        return {k: v for k, v in r.items() if k not in ("n_rows", "seconds")}

    def validate(self, embedder, cpu_bf16):
        return self._scores(embedder, self.val, self.head_snapshot(), cpu_bf16)

    def test_scores(self, model, cpu_bf16, folder):
        head = ClassifierHead.load(folder) if (folder / HEAD_FILE).exists() else None
        return self._scores(model, self.test_data, head, cpu_bf16)

    def test(self, base, tuned, cpu_bf16, best_dir):
        t = self.test_scores(tuned, cpu_bf16, best_dir)
        b = self._scores(base, self.test_data, None, cpu_bf16)
        b |= {k: float("nan") for k in t if k.startswith("head_")}  # the base model has no head
        n = len(self.test_data.texts)
        return TestResult(f"held-out test: {n} rows, {len(self.labels)} labels", b, t, {"test_rows": n})


TASK_TYPES: dict[str, type[Task]] = {"retrieval": RetrievalTask, "sts": STSTask, "classification": ClassificationTask}


# ---- the sampler over tasks ----------------------------------------------------------------------------------
class TaskSampler:
    """Micro-batches of one task and one --data file at a time, as FlagEmbedding draws each batch from one file. Each
    (task, file) stream has its own Sampler (one pass over its items per epoch); an epoch's batches of all streams are
    interleaved in an order drawn by (seed, epoch), so the whole state is still one integer, the micro-step. With a
    single task of a single file the order is exactly that task's Sampler.

    A stage task (Task.stage: --distill-corpus, --unlabeled-stage) comes first: its `stage_steps` optimiser steps
    (stage_steps x grad_accum micro-batches, its own epochs over its items; 0 = one pass) before any batch of the
    others, whose epochs then start at 0. One micro-step counter still covers the whole run, so resuming mid-stage is exact."""

    def __init__(self, tasks: dict[str, Task], batch_size: int, seed: int, min_size: int = 1, stage_steps: int = 0,
                 grad_accum: int = 1):
        self.seed = seed
        make = lambda texts, t, seed: Sampler([Example(text, []) for text in texts], batch_size, seed,
                                              min_size=min_size, per_epoch=t.per_epoch)
        # (task, file) -> (its Sampler, the task's anchor index of each of the stream's items)
        self.streams: dict[tuple[str, int], tuple[Sampler, list[int]]] = {}
        for name, t in tasks.items():
            if t.stage:
                continue
            anchors, files = t.anchors(), t.anchor_files()
            for f in sorted(set(files)):
                own = [i for i, x in enumerate(files) if x == f]
                self.streams[name, f] = make([anchors[i] for i in own], t, seed if f == 0 else f"{seed}/file/{f}"), own
        self.stage_name = next((name for name, t in tasks.items() if t.stage), None)
        self.stage = make(tasks[self.stage_name].anchors(), tasks[self.stage_name], seed) if self.stage_name else None
        self.stage_steps = (stage_steps or math.ceil(self.stage.epoch_length(0) / grad_accum)) if self.stage else 0
        self.stage_batches = self.stage_steps * grad_accum
        self._epoch, self._order = -1, []

    def epoch_batches(self, epoch: int) -> list[tuple[str, list[int]]]:
        """(task, item indices) of every batch of one epoch, in order."""
        if epoch != self._epoch:
            order = [(name, [own[i] for i in b]) for (name, _), (s, own) in self.streams.items()
                     for b in s.epoch_batches(epoch)]
            if len(self.streams) > 1:
                random.Random(f"{self.seed}/tasks/{epoch}").shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def epoch_length(self, epoch: int) -> int:
        return sum(s.epoch_length(epoch) for s, _ in self.streams.values())

    def __len__(self) -> int:
        return self.epoch_length(0)

    def batch(self, micro_step: int) -> tuple[int, str, list[int]]:
        """(epoch, task, item indices) of the micro_step-th batch of the run."""
        if micro_step < self.stage_batches:
            epoch, indices = self.stage.batch(micro_step)
            return epoch, self.stage_name, indices
        micro_step -= self.stage_batches
        epoch = 0
        while micro_step >= self.epoch_length(epoch):
            micro_step -= self.epoch_length(epoch)
            epoch += 1
        name, indices = self.epoch_batches(epoch)[micro_step]
        return epoch, name, indices


# ---- data: training items, the held-out split, validation and test sets ----------------------------------------
def item_id(item: Example | Pair | Labelled) -> str:
    """The id split.json lists under the item's task: a retrieval line's qid (its line number, or the BEIR query id),
    else the line number; in a run of several --data sources, prefixed by the source ("<file>:"; bge.data
    read_training_data prefixes qids). Ids are unique within a task only (a numeric qid may be another task's line
    number), so the split keeps one id list per task."""
    if isinstance(item, Example):
        return item.qid
    return str(item.line) if item.file is None else f"{item.file}:{item.line}"


SPLIT_FORMAT = 2  # 1: one train/val/test id list for all tasks, whose ids could collide; 2: lists per task


def read_split(path: Path, tasks: list[str]) -> dict:
    """A run's split.json, as {"tasks": {task: {"train", "val", "test"}}, ...}. A format-1 file (one id list for all
    tasks) is read for a single-task run, where its ids are unambiguous; a mixed run's cannot be trusted."""
    split = json.loads(path.read_text())
    if split.get("format", 1) == 1:
        if len(tasks) > 1:
            raise UserError(f"{path}: an old split (one id list for every task, so ids of different tasks collided); "
                            f"this mixed run cannot be resumed exactly: start a new run")
        split = {"format": SPLIT_FORMAT, **{k: v for k, v in split.items() if k not in ("train", "val", "test")},
                 "tasks": {tasks[0]: {part: split[part] for part in ("train", "val", "test")}}}
    missing = [t for t in tasks if t not in split["tasks"]]
    if missing:
        raise UserError(f"{path}: no split for the {', '.join(missing)} items of --data (the data changed since?)")
    return split


def split_items(task: str, items: list, val_ratio: float, test_ratio: float, seed: int) -> dict[str, list[int]]:
    """Held-out split of one task's items. Items that share a text stay in one split: retrieval queries that share a
    positive (split_queries), STS pairs that share a sentence, classification rows with the same text."""
    if task == "retrieval":
        return split_queries(items, val_ratio, test_ratio, seed)
    texts = [(p.sentence1, p.sentence2) for p in items] if task == "sts" else [(r.text,) for r in items]
    return split_by_keys([{text_hash(t) for t in ts} for ts in texts], val_ratio, test_ratio, seed)


def held_out(task: str, items: list, ids: list[str], full: RetrievalData | None, name: str):
    """A task's carved validation or test set: the items with these ids, as the task's evaluation data (None if none)."""
    keep = set(ids)
    if task == "retrieval":
        d = full.subset(ids)
        return d if d.queries else None
    rows = [it for it in items if item_id(it) in keep]
    if not rows:
        return None
    if task == "sts":
        return STSData([p.sentence1 for p in rows], [p.sentence2 for p in rows], [p.score for p in rows], name,
                       [p.line for p in rows])
    return ClassificationData.of(rows, name)


def task_of(data) -> str:
    return "retrieval" if isinstance(data, RetrievalData) else "sts" if isinstance(data, STSData) else "classification"


def load_tasks(cfg: TrainConfig, run_dir: Path, write: bool = True) -> tuple[dict[str, Task], dict]:
    """The run's tasks with their training items, validation and test sets, and the split. Without --val/--test
    files, items are carved out of --data by seed (per task, over every --data source's items of it, no shared text
    across splits) and the split is written to the run folder. A --val/--test file validates or tests the task of its
    kind; nothing is carved then."""
    for flag, parse in (("mine_range", parse_range), ("mine_margin", parse_margin)):
        try:
            parse(getattr(cfg, flag))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"--{flag.replace('_', '-')}: {e}") from None
    data = read_training_data(data_sources(cfg.data, cfg.extra_data), cfg.task, cfg.split, cfg.title, cfg.corpus,
                              cfg.skip_bad_lines)
    for note in data.notes:
        console.print(note)
    items, full = data.items, data.full
    for task in data.extra_items.keys() - items.keys():  # nothing would validate or test what it teaches
        files = " ".join(sorted({str(data.sources[it.file].path) for it in data.extra_items[task]}))
        raise UserError(f"--extra-data {files} has {task} items and --data has none: nothing would validate or test "
                        f"them (put that file in --data, or leave it out)")
    split_file = run_dir / "split.json"
    if split_file.exists():  # resuming: the split is part of the run
        split = read_split(split_file, list(items))
    else:
        val_ratio = 0.0 if cfg.val else cfg.val_ratio
        test_ratio = 0.0 if cfg.test else cfg.test_ratio
        seed = cfg.split_seed if cfg.split_seed >= 0 else cfg.seed
        split = {"format": SPLIT_FORMAT, "seed": seed, "val_ratio": val_ratio, "test_ratio": test_ratio,
                 "tasks": {task: {part: [item_id(rows[i]) for i in idx]
                                  for part, idx in split_items(task, rows, val_ratio, test_ratio, seed).items()}
                           for task, rows in items.items()}}
        if write:  # under torchrun every rank computes the same split; rank 0 writes it
            atomic_write_text(split_file, json.dumps(split) + "\n")
    given = {}
    for flag, file, part in (("--val", cfg.val, "dev"), ("--test", cfg.test, "test")):
        if file:
            d = load_eval_data(file, part, cfg.title)
            if task_of(d) not in items:
                raise UserError(f"{flag} {file} is {task_of(d)} data, but --data has no {task_of(d)} lines")
            given[flag] = d
    tasks = {}
    for task, rows in items.items():
        parts = split["tasks"][task]
        train_ids = set(parts["train"])
        train = [it for it in rows if item_id(it) in train_ids]
        if not train:
            raise UserError(f"{data.name}: no {task} training items left after holding out validation and test items")
        train += data.extra_items.get(task, [])  # after --data's, so that its items keep their places
        sets = []
        for flag, part in (("--val", "val"), ("--test", "test")):
            if flag in given:
                sets.append(given[flag] if task_of(given[flag]) == task else None)
            else:
                sets.append(held_out(task, rows, parts[part], full, f"{data.name}/{part}"))
        tasks[task] = TASK_TYPES[task](train, *sets, cfg)
        tasks[task].no_in_batch_files = {k for k, src in enumerate(data.sources) if not src.in_batch_negatives}
    if "retrieval" in tasks:
        tasks["retrieval"].full = full  # the corpus hard negatives are mined from
        tasks["retrieval"].extra_sets = data.extra_sets  # an --extra-data source's own, for its queries
    if cfg.unlabeled != "off":
        tasks["unlabeled"] = unlabeled_task(cfg, tasks, data.sources)
    if cfg.distill_corpus:
        carved = [src for src in data.sources if not src.extra]
        tasks["corpus"] = corpus_task(cfg, tasks, carved[0].path if len(carved) == 1 else None)
    return tasks, split


def unlabeled_task(cfg: TrainConfig, tasks: dict[str, Task], sources: list[Source]) -> UnlabeledTask:
    """Pseudo-pairs (--unlabeled) from the run's corpus: the BEIR --data folders' corpora, --corpus, and the passages
    of the files' training lines, without titles for the latter."""
    retrieval = tasks.get("retrieval")
    if retrieval is None:
        raise UserError(f"--unlabeled {cfg.unlabeled} makes query/passage pairs; --data has no retrieval lines")
    passages = [p for src in sources if src.beir and not src.extra for p in read_passages(src.path)]
    passages += read_passages(cfg.corpus) if cfg.corpus else []
    own = {k for k, src in enumerate(sources) if not (src.beir or src.extra)}  # the domain's files, not --extra-data
    passages += [("", t) for ex in retrieval.train if (ex.file or 0) in own for t in ex.pos + ex.neg]
    pairs = pseudo_pairs(unique(passages), KINDS[cfg.unlabeled], cfg.seed)
    if not pairs:
        where = cfg.corpus or " ".join(str(src.path) for src in sources)
        raise UserError(f"--unlabeled {cfg.unlabeled}: no passage of {where} gives a pair (titles of "
                        f"{MIN_WORDS}+ words, or passages of 3+ sentences)")
    return UnlabeledTask(pairs, cfg, per_epoch=max(1, round(cfg.unlabeled_ratio * len(retrieval.items))))


def missing_sets(tasks: dict[str, Task], cfg: TrainConfig) -> list[tuple[str, str, str]]:
    """(task, 'validation' or 'test', why) for each held-out set a run lacks: said before training, not found out
    at the end (a small file can leave a carved set empty)."""
    out = []
    for t in tasks.values():
        for part, data, flag in (("validation", t.val, "val"), ("test", t.test_data, "test")):
            if data is not None:
                continue
            ratio = getattr(cfg, f"{flag}_ratio")
            why = (f"--{flag} {getattr(cfg, flag)} holds another task's data" if getattr(cfg, flag) else
                   f"--{flag}-ratio 0" if ratio == 0 else
                   f"{ratio:g} of its {len(t.train)} training items rounds to none; a bigger file or --{flag} FILE")
            out.append((t.name, part, why))
    return out


# ---- validation across tasks, and the exported model --------------------------------------------------------------
def validate(tasks: dict[str, Task], embedder: Embedder, cpu_bf16: bool) -> tuple[dict[str, float], float | None]:
    """Every task's validation metrics (prefixed 'task/' when the run has several tasks) and the score that chooses
    best/: the task's own metric (nDCG@10, Spearman, kNN macro-F1), or for several tasks the mean of theirs. None when
    no task has a validation set."""
    metrics, primary = {}, []
    judged = labelled(tasks)
    for name, task in judged.items():
        if task.val is None:
            continue
        scores = task.validate(embedder, cpu_bf16)
        metrics |= {(f"{name}/{k}" if len(judged) > 1 else k): v for k, v in scores.items()}
        primary.append(scores[task.metric])
    for name, task in tasks.items():  # training signal with a held-out check of its own (--distill-corpus): logged only
        if name not in judged and task.val is not None:
            metrics |= {f"{name}/{k}": v for k, v in task.validate(embedder, cpu_bf16).items()}
    return metrics, (sum(primary) / len(primary) if primary else None)


def probe_scores(embedder: Embedder, probe: RetrievalData | STSData | None, cfg: TrainConfig,
                 cpu_bf16: bool) -> dict[str, float]:
    """probe/<metric> on the --general-probe set: how much general ability the model keeps ({} without a probe)."""
    if probe is None:
        return {}
    scores = evaluate_probe(embedder, probe, batch_size=cfg.eval_batch_size, max_length=cfg.max_passage_length,
                            query_max_length=cfg.max_query_length, cpu_bf16=cpu_bf16)
    return {f"probe/{k}": v for k, v in scores.items()}


def validation_scores(tasks: dict[str, Task], embedder: Embedder, cpu_bf16: bool,
                      probe: RetrievalData | STSData | None = None) -> dict[str, float]:
    """What a validation logs: val/<metric> of every task (validate), val/score (what chooses best/) and
    probe/<metric>."""
    scores, score = validate(tasks, embedder, cpu_bf16)
    cfg = next(iter(tasks.values())).cfg
    return {f"val/{k}": v for k, v in scores.items()} | {"val/score": score} | probe_scores(embedder, probe, cfg, cpu_bf16)


def metric_label(tasks: dict[str, Task]) -> str:
    """What the best/ score is, for the log line."""
    judged = labelled(tasks)
    return next(iter(judged.values())).metric_label if len(judged) == 1 else "mean of the tasks' metrics"


def labelled(tasks: dict[str, Task]) -> dict[str, Task]:
    """The tasks whose data has labels: those validated, tested and reported (not --unlabeled's pseudo-pairs)."""
    return {name: t for name, t in tasks.items() if t.labelled}


def export(embedder: Embedder, tasks: dict[str, Task], folder: Path) -> None:
    """The model folder (transformers and sentence-transformers load it) with a model card that tells the run's story
    (the run folder is `folder`'s parent), plus the classification head, if trained, in its own file beside it."""
    cfg = next(iter(tasks.values())).cfg
    lr = cfg.lr or default_lr(embedder.dim, cfg.arch)
    embedder.save(folder, base=cfg.model, run=card.run_story(cfg, tasks, folder.parent, folder.name, lr))
    task = tasks.get("classification")
    if isinstance(task, ClassificationTask) and task.head is not None:
        task.head_snapshot().save(folder)
