"""TrainConfig: every knob of a run, each one a typed --flag; `--config preset.toml` overrides the defaults.

Precedence: dataclass defaults < preset TOML < command-line flags. A TOML file may use flat keys or
[section] tables named after each field's section (so `loss.temperature` and `temperature` are the same key).
Unknown keys and flags are errors, never silently ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bge.errors import UserError


@dataclass(frozen=True)
class Range:
    """The values a number may take, written as an interval: "[0, 1)", "(0, inf)", "[1, inf)"."""

    text: str
    lo: float
    hi: float
    lo_closed: bool
    hi_closed: bool

    @classmethod
    def parse(cls, text: str) -> "Range":
        m = re.fullmatch(r"([\[(])(-?inf|-?[\d.e+-]+), (-?inf|-?[\d.e+-]+)([\])])", text)
        if not m:
            raise ValueError(f"not an interval: {text!r}")
        return cls(text, float(m[2]), float(m[3]), m[1] == "[", m[4] == "]")

    def __contains__(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        above = v >= self.lo if self.lo_closed else v > self.lo
        below = v <= self.hi if self.hi_closed else v < self.hi
        return above and below

    def __str__(self) -> str:
        return self.text


class Bounded:
    """An argparse `type` for the other CLIs' numbers: converts the text (int or float) and carries the Range that
    check_ranges enforces once every flag is parsed, so that the error is one line naming the flag."""

    def __init__(self, kind: type, range: str):
        self.kind, self.range, self.__name__ = kind, Range.parse(range), kind.__name__

    def __call__(self, text: str):
        return self.kind(text)


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Every Bounded flag's value inside its range, else a UserError naming the flag, its value and the range."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if isinstance(action.type, Bounded) and value is not None and value not in action.type.range:
            raise UserError(f"{action.option_strings[0]}: must be in {action.type.range}, got {value!r}")
    return args


def opt(default, help: str, section: str, choices: tuple | None = None, range: str | None = None,
        items: type | None = None):
    """A config field with its help text and section; a number (or, with `items`, a comma-separated list of numbers
    of that type) has the `range` its values must lie in, checked before any work."""
    return field(default=default, metadata={"help": help, "section": section, "choices": choices,
                                            "range": Range.parse(range) if range else None, "items": items})


@dataclass
class TrainConfig:
    # data
    data: tuple[str, ...] = opt((), "training data, one or more: FlagEmbedding-format JSONL files, STS TSV files, BEIR "
                                "folders (with --split), folders of *.jsonl files (one file each); each micro-batch "
                                "comes from one file, and a file or folder named *no_in_batch_neg trains without "
                                "in-batch negatives (FlagEmbedding's conventions)", "data")
    extra_data: tuple[str, ...] = opt((), "more training data, in --data's formats, trained on but never held out: "
                                      "nothing of it is carved for validation or test, so the split and the held-out "
                                      "sets stay --data's alone (another domain's or a public set's pairs beside your "
                                      "own); each of its retrieval sources is mined against its own passages", "data")
    split: str = opt("train", "qrels split to train on when --data is a BEIR folder", "data")
    val: str = opt("", "validation set (JSONL or BEIR folder); default: carved from --data", "data")
    test: str = opt("", "test set (JSONL or BEIR folder); default: carved from --data", "data")
    split_seed: int = opt(-1, "seed of the held-out split (negative = --seed): fix it to compare training seeds on "
                          "one test set", "data", range="[-1, inf)")
    val_ratio: float = opt(0.15, "share of queries carved out for validation", "data", range="[0, 1)")
    test_ratio: float = opt(0.15, "share of queries carved out for the final test", "data", range="[0, 1)")
    skip_bad_lines: bool = opt(False, "drop malformed lines (and say how many) instead of stopping", "data")
    title: bool = opt(True, "BEIR corpora: passage = title + ' ' + text (--no-title: text only)", "data")
    task: str = opt("auto", "task of the lines without a `type` field: auto (by their fields), retrieval, sts "
                    "(sentence1, sentence2, score) or classification (text, label)", "data",
                    ("auto", "retrieval", "sts", "classification"))
    corpus: str = opt("", "evaluation corpus for the queries carved out of a JSONL --data: a BEIR folder or a JSONL "
                          "of passages, plus the file's own passages (default: the file's passages only)", "data")
    unlabeled: str = opt("off", "pseudo-pairs from the corpus's unlabeled passages as an extra task (bge/unlabeled.py): "
                         "title (title -> body), ict (a sentence -> the rest of its passage), both, or off", "data",
                         ("off", "title", "ict", "both"))
    unlabeled_ratio: float = opt(1.0, "--unlabeled pairs drawn per epoch, as a multiple of the labelled training items",
                                 "data", range="(0, inf)")
    unlabeled_stage: bool = opt(False, "--unlabeled's pseudo-pairs as a first stage (--unlabeled-ratio x the labelled "
                                "items, in-batch negatives) before any labelled batch, under one learning-rate "
                                "schedule, instead of mixed into every epoch", "data")
    # model
    model: str = opt("auto", "base model: a folder, a hub id, all-MiniLM-L6-v2, or auto", "model")
    query_prompt: str = opt("auto", "query instruction; 'auto' = the model's own, or 'query: ' to train retrieval on a "
                            "pretrained transformer that states none; '' = none", "model")
    passage_prompt: str = opt("auto", "passage instruction; 'auto' = the model's own (its folder's document prompt), "
                              "'' = none", "model")
    max_query_length: int = opt(64, "query truncation length in tokens", "model", range="[1, inf)")
    max_passage_length: int = opt(256, "passage truncation length in tokens", "model", range="[1, inf)")
    arch: str = opt("bert", "encoder: bert = --model's transformer; bilstm = a new gated BiLSTM (bge/lstm.py) "
                    "with --model's tokenizer and word embeddings, or --model itself if it is a saved BiLSTM",
                    "model", ("bert", "bilstm"))
    lstm_hidden: int = opt(192, "BiLSTM: LSTM units per direction (each layer carries twice as many features)",
                           "model", range="[1, inf)")
    lstm_layers: int = opt(2, "BiLSTM: number of gated bidirectional LSTM layers", "model", range="[1, inf)")
    lstm_dim: int = opt(0, "BiLSTM: sentence embedding size (0 = --model's hidden size)", "model", range="[0, inf)")
    lstm_dropout: float = opt(0.1, "BiLSTM: dropout on the embeddings and on each layer's LSTM output", "model",
                              range="[0, 1)")
    lstm_highway: bool = opt(True, "BiLSTM: a highway gate in each layer (each feature mixes the layer's output with "
                             "its input); --no-lstm-highway: a plain residual, LayerNorm(x + lstm(x))", "model")
    lstm_pooling: str = opt("attention", "BiLSTM: pooling over the real tokens: gated attention (learned weights), "
                            "mean, or max (per feature)", "model", ("attention", "mean", "max"))
    lstm_embed_dim: int = opt(0, "BiLSTM: word table width, up to --model's hidden size (0 = that size); "
                              "narrower: --model's table projected onto its top principal components (PCA)", "model",
                              range="[0, inf)")
    lstm_embed_init: str = opt("model", "BiLSTM: the word table starts as --model's (copied, or PCA-projected at "
                               "--lstm-embed-dim) or random, N(0, 0.02)", "model", ("model", "random"))
    freeze_embeddings: bool = opt(False, "do not train the embeddings (BERT: word, position and token-type tables "
                                  "and their LayerNorm; BiLSTM: the word table)", "model")
    freeze_layers: int = opt(0, "do not train the first N transformer layers (BiLSTM: LSTM layers); embeddings "
                             "are frozen by --freeze-embeddings alone", "model", range="[0, inf)")
    # batch and loss
    batch_size: int = opt(32, "queries per optimiser micro-step (each brings group_size passages)", "loss",
                          range="[1, inf)")
    group_size: int = opt(4, "passages per query: 1 positive + group_size-1 hard negatives", "loss", range="[1, inf)")
    positives: str = opt("one", "each epoch a query brings one positive drawn from its pos (one: FlagEmbedding's), "
                         "or every (query, positive) pair is an item of its own (all: sentence-transformers')", "loss",
                         ("one", "all"))
    mine_negatives: int = opt(-1, "retrieval data without hard negatives: mine this many per training query with the "
                              "base model before training (bge/mine.py; cached by corpus, model and split); 0 = off; "
                              "-1 = 7 for a pretrained transformer, off for a new BiLSTM (benchmarks/quality.py: "
                              "+2.6 nDCG@10 on SciFact over in-batch only)", "loss", range="[-1, inf)")
    mine_range: str = opt("10-100", "mining: sample negatives from these ranks (A-B: ranks A+1..B, skipping the top A)",
                          "loss")
    mine_with: str = opt("model", "mining: rank the candidates with the base model (model), with BM25 over the passages' "
                         "words (bm25: lexical near misses) or with both rankings fused by reciprocal rank (hybrid); the "
                         "margin filter always scores them with the model", "loss", ("model", "bm25", "hybrid"))
    mine_margin: str = opt("5%", "mining: drop candidates scoring above (1 - p) x the weakest positive (5%%) or above it "
                           "minus an absolute margin (0.05): likely unlabelled positives", "loss")
    remine: bool = opt(False, "mining: mine the negatives again with the model being trained at the end of each epoch "
                       "but the last (ANCE's refresh; the validation's corpus encoding is reused), instead of keeping "
                       "the base model's", "loss")
    temperature: float = opt(0.02, "softmax temperature on cosine scores (BGE: 0.02)", "loss", range="(0, inf)")
    in_batch_negatives: bool = opt(True, "use the other queries' passages as negatives", "loss")
    symmetric: bool = opt(False, "add the passage-to-query InfoNCE term", "loss")
    cross_device_negatives: bool = opt(True, "under torchrun, every device's passages are negatives for every query",
                                       "loss")
    sts_loss: str = opt("cosent", "STS pairs: CoSENT (ranks pairs by gold score) or cosine_mse (cosine vs gold "
                        "scaled to [0, 1])", "loss", ("cosent", "cosine_mse"))
    cosent_scale: float = opt(20.0, "CoSENT's scale on cosine differences (1 / temperature)", "loss", range="(0, inf)")
    classification_loss: str = opt("contrastive", "classification rows: contrastive (same label = positive), head "
                                   "(linear head + cross-entropy), or both", "loss", ("contrastive", "head", "both"))
    contrastive_weight: float = opt(1.0, "with --distill-from: weight of the InfoNCE term next to the "
                                    "distillation terms (0 = distillation alone)", "loss", range="[0, inf)")
    # distillation
    distill_from: str = opt("", "teacher model (folder, hub id, all-MiniLM-L6-v2): the student also learns to "
                            "match its embeddings and in-batch similarities", "distill")
    distill_loss: str = opt("cosine", "embedding term: 1 - cos(student, teacher), or MSE of the normalised "
                            "embeddings (which is 2 (1 - cos) / dim); none = the KL term only", "distill",
                            ("cosine", "mse", "none"))
    distill_weight: float = opt(1.0, "weight of the embedding term", "distill", range="[0, inf)")
    distill_kl: float = opt(1.0, "weight of KL(teacher || student) between the query-to-passage similarity "
                            "distributions over the batch", "distill", range="[0, inf)")
    distill_temperature: float = opt(0.05, "temperature of the similarity distributions in the KL term",
                                     "distill", range="(0, inf)")
    distill_corpus: str = opt("", "a first stage on unlabeled text: the student matches the teacher's embeddings (and "
                              "in-batch similarities; no contrastive term) of this corpus's passages, sentences and "
                              "spans cut from them, and the training queries, then trains on the labelled data as "
                              "usual; a BEIR folder, a JSONL of passages, or 'data' (--data's own passages); '' = none",
                              "distill")
    distill_corpus_steps: int = opt(0, "optimiser steps of the --distill-corpus stage (0 = one pass over its passages "
                                    "and queries); they come before --epochs/--max-steps of labelled data, under one "
                                    "learning-rate schedule", "distill", range="[0, inf)")
    distill_corpus_val: int = opt(100, "--distill-corpus passages held out (at most a tenth of the corpus): the "
                                  "stage's loss on them is validated as val/corpus/distill_loss", "distill",
                                  range="[0, inf)")
    kd_weight: float = opt(0.0, "weight of the KL term towards teacher scores (pos_scores/neg_scores on every line; "
                                "python -m bge.score fills them); 0 = off", "loss", range="[0, inf)")
    kd_temperature: float = opt(0.02, "temperature of the teacher's scores: 0.02 for cosines (bge.score), 1 for "
                                      "reranker logits (FlagEmbedding's default)", "loss", range="(0, inf)")
    matryoshka_dims: str = opt("", "also apply the loss to embeddings truncated to these sizes, e.g. 256,128,64", "loss",
                               range="[1, inf)", items=int)
    # optimisation
    lr: float = opt(0.0, "peak learning rate; 0 = by model size (3e-5 small, 2e-5 base, 1e-5 large)", "optim",
                    range="[0, inf)")
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and LayerNorms)", "optim", range="[0, inf)")
    warmup_ratio: float = opt(0.1, "share of steps spent warming up linearly", "optim", range="[0, 1]")
    schedule: str = opt("linear", "decay after warmup", "optim", ("linear", "cosine", "constant"))
    epochs: int = opt(3, "passes over the training queries", "optim", range="[0, inf)")
    max_steps: int = opt(0, "stop after this many optimiser steps (0 = epochs decide)", "optim", range="[0, inf)")
    grad_accum: int = opt(1, "micro-batches per optimiser step", "optim", range="[1, inf)")
    clip_grad: float = opt(1.0, "max gradient norm (0 = no clipping)", "optim", range="[0, inf)")
    layer_lr_decay: float = opt(1.0, "layer-wise learning-rate decay: each layer trains at this times the rate of the "
                                "layer above it, the embeddings lowest (1 = off; ELECTRA fine-tuned at 0.8-0.9)",
                                "optim", range="(0, 1]")
    head_lr: float = opt(1e-2, "learning rate of the classification head (it starts from zero)", "optim",
                         range="(0, inf)")
    # regularisation (weight decay is in optim)
    l1: float = opt(0.0, "L1 penalty lambda * sum |w| on the trainable matrices (weight decay's set: no biases, "
                    "no LayerNorms)", "regularisation", range="[0, inf)")
    hidden_dropout: float = opt(-1.0, "dropout on embeddings and layer outputs while fine-tuning (negative = the "
                                "model's, 0.1 for BERT)", "regularisation", range="(-inf, 1)")
    attention_dropout: float = opt(-1.0, "dropout on attention probabilities while fine-tuning (negative = the "
                                   "model's)", "regularisation", range="(-inf, 1)")
    # loop
    eval_every: int = opt(0, "validate every N optimiser steps (0 = once per epoch)", "loop", range="[0, inf)")
    save_every: int = opt(0, "write resumable trainer state every N steps (0 = at each validation)", "loop",
                          range="[0, inf)")
    patience: int = opt(0, "stop after N validations without improvement (0 = never)", "loop", range="[0, inf)")
    max_bad_steps: int = opt(5, "stop when the loss is NaN/inf this many steps in a row", "loop", range="[1, inf)")
    log_every: int = opt(0, "read the loss, accuracy and NaN flag back from the device every N steps (metrics.jsonl "
                         "still has every step; a NaN run stops at the read-back); 0 = every step on CPU, where "
                         "reading back costs nothing, every 10 on CUDA, where it stalls the queue", "loop",
                         range="[0, inf)")
    seed: int = opt(42, "seed for the split, the sampler, dropout and initialisation", "loop", range="[0, inf)")
    precision: str = opt("auto", "auto = bf16 autocast on CUDA (fp16 if unsupported) and on CPUs with native bf16 "
                         "(AVX512-BF16/AMX), else fp32", "loop",
                         ("auto", "fp32", "bf16", "fp16"))
    compile: bool = opt(False, "torch.compile the encoder", "speed")
    compile_mode: str = opt("default", "torch.compile's mode when --compile is on: reduce-overhead records CUDA graphs "
                            "once per input shape and replays them (pair it with --attention varlen --token-bucket)",
                            "speed", ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    packed: bool = opt(False, "run projections and feed-forward on real tokens only (no FLOPs on padding); off by "
                       "default: measured slower than padded at SciFact's 12%% padding, CPU and H200 (README)", "speed")
    attention: str = opt("sdpa", "packed attention: sdpa (padded view), flex (FlexAttention document mask; CUDA, no "
                         "attention dropout) or varlen (texts packed on the host, one forward per micro-batch; CUDA: "
                         "FlashAttention over the sequence offsets, a padded view when attention dropout is on; "
                         "elsewhere the padded view)", "speed", ("sdpa", "flex", "varlen"))
    token_bucket: int = opt(0, "with --attention varlen: pad each micro-batch's packed tokens up to a multiple of N, so "
                            "its shapes repeat and CUDA graphs (--compile-mode reduce-overhead) record once per "
                            "bucket (0 = exact size)", "speed", range="[0, inf)")
    grad_cache: int = opt(-1, "GradCache chunk size in texts: big batches in fixed memory, same gradients; 0 = off; "
                          "-1 = 32 on CPU for a micro-batch of over 24,576 padded tokens (SciFact's mined default: "
                          "8.5 -> 3.0 GB peak), 16 over 12,288 when training in fp32 (activations twice the size), "
                          "off on CUDA", "speed", range="[-1, inf)")
    grad_checkpointing: bool = opt(False, "recompute each layer's activations in the backward pass: less "
                                   "memory, more time", "speed")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default); on a busy CPU 1 can be several times "
                       "faster for the BiLSTM, whose recurrence synchronises the threads at every token", "speed",
                       range="[0, inf)")
    malloc: str = opt("keep", "CPU runs: keep = glibc malloc keeps freed memory for the next step instead of "
                      "unmapping it and faulting it in again (bge/malloc.py: SciFact's run 6%% faster, 0.2-0.5 GB "
                      "more at its peak); system = glibc's defaults", "speed", ("keep", "system"))
    device: str = opt("auto", "cpu, cuda, cuda:1, or auto", "loop")
    eval_batch_size: int = opt(128, "batch size for encoding during evaluation", "loop", range="[1, inf)")
    # forgetting guard
    general_probe: str = opt("", "a general-domain set (STS TSV, BEIR folder or JSONL) scored at every validation and "
                                 "at the end, to watch what fine-tuning costs elsewhere", "guard")
    probe_split: str = opt("test", "qrels split when --general-probe is a BEIR folder", "guard")
    merge_sweep: str = opt("", "after training, mix base and fine-tuned weights at these ratios of the fine-tuned "
                               "model (e.g. 0.25,0.5,0.75), validate each and export the chosen mix to merged/", "guard",
                       range="[0, 1]", items=float)
    merge_ratio: float = opt(-1.0, "export this fixed mix to merged/ (0 = base, 1 = fine-tuned; negative = none)",
                             "guard", range="(-inf, 1]")
    probe_tolerance: float = opt(0.01, "merge sweep: the most the probe's headline score may fall below the base "
                                       "model's for a mix to be chosen", "guard", range="[0, inf)")
    # run
    out_dir: str = opt("checkpoints", "where run folders go", "run")
    cache_dir: str = opt("", "where corpus embeddings and mined negatives are cached (default: <out-dir>/cache); runs "
                         "that share it encode the base model's corpus once", "run")
    run_name: str = opt("", "run folder name (default: data name + time)", "run")
    resume: str = opt("", "continue the run in this folder from its last saved state", "run")
    explain: int = opt(5, "retrieval diagnostics at the end: the N test queries whose nDCG@10 changed most (0 = off)",
                       "run", range="[0, inf)")
    threshold_precision: float = opt(0.9, "the diagnostics suggest the similarity threshold that reaches this "
                                     "precision", "run", range="(0, 1]")
    report_to: str = opt("none", "also write metrics.jsonl's scalars as TensorBoard events in the run folder's "
                         "tensorboard/ (pip install tensorboard)", "run", ("none", "tensorboard"))

    def __post_init__(self):
        if isinstance(self.data, str):  # TrainConfig(data="a.jsonl"): one path
            self.data = (self.data,) if self.data else ()
        self.data = tuple(self.data)
        if isinstance(self.extra_data, str):
            self.extra_data = (self.extra_data,) if self.extra_data else ()
        self.extra_data = tuple(self.extra_data)

    def to_dict(self) -> dict:
        """The fields as JSON holds them (config.json, results.json): lists for the list fields."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    if isinstance(t, types.UnionType):  # `float | None` style: take the concrete type
        t = next(a for a in t.__args__ if a is not type(None))
    return t


def _convert(f: dataclasses.Field, value, where: str):
    """A TOML/CLI value as the field's declared type, with a clear error."""
    t = _field_type(f)
    if typing.get_origin(t) is tuple:  # paths: a TOML or JSON list, the flag's words, or one path as a string
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) and v for v in values):
            raise UserError(f"{where}: {f.name} must be a list of paths, got {value!r}")
        return tuple(values)
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: {f.name} must be true or false, got {value!r}")
    try:
        v = t(value) if not (t is int and isinstance(value, float) and not value.is_integer()) else None
    except (TypeError, ValueError):
        v = None
    if v is None or (t is int and isinstance(value, bool)):
        raise UserError(f"{where}: {f.name} must be {t.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and v not in choices:
        raise UserError(f"{where}: {f.name} must be one of {', '.join(choices)}, got {v!r}")
    numbers(f, v, where)
    return v


def numbers(f: dataclasses.Field, value, where: str) -> list:
    """The field's value as numbers checked against its range: [value] for a number, the parsed list for a list field
    (`items`), [] for other fields. A value outside the range is one line naming the flag, the value and the range."""
    rng, items = f.metadata.get("range"), f.metadata.get("items")
    if rng is None:
        return []
    if items is None:
        values = [value]
    else:
        try:
            values = [items(x) for x in str(value).split(",") if x.strip()]
            if str(value).strip() and not values:
                raise ValueError
        except ValueError:
            raise UserError(f"{where}: {f.name} must be {items.__name__}s separated by commas, got {value!r}") from None
    bad = next((x for x in values if x not in rng), None)
    if bad is not None:
        raise UserError(f"{where}: {f.name} must be in {rng}, got {value!r}")
    return values


def mined_negatives(cfg: "TrainConfig") -> int:
    """--mine-negatives as a count: -1 (the default) mines 7 for a pretrained transformer, whose own ranking makes
    useful negatives, and none for a new BiLSTM, whose ranking before training is noise."""
    if cfg.mine_negatives >= 0:
        return cfg.mine_negatives
    return 7 if cfg.arch == "bert" else 0


AUTO_CHUNK = 32  # --grad-cache -1 on CPU: chunks of 32 texts for a micro-batch of over AUTO_TOKENS padded tokens
AUTO_TOKENS = 24576  # 96 passages of 256 tokens: about 6 GB for MiniLM plain in bf16 (scaled from 8.5 GB at 35k)
AUTO_TOKENS_FP32 = AUTO_TOKENS // 2  # fp32: activations twice the size; a quarter bounded more, at 1.2x the step (README)


def grad_cache_chunk(grad_cache: int, device_type: str, inputs: dict[str, list[list[int]]],
                     chunked_before: bool = False, fp32: bool = False) -> int:
    """--grad-cache (its value) as a chunk size for a micro-batch (0 = one plain forward and backward). On CPU a
    plain step keeps every layer's activations of every text: 32 queries + 128 passages of 256 tokens (SciFact with
    the mined default, 35k padded tokens) peaked at 8.5 GB, in chunks of 32 texts at 3.0 GB. The price is an extra
    forward without autograd: measured no slower at 1 thread and 1.3-1.7x slower at 2 (README, "Bounded by default").
    Short texts stay plain (the example file's 32 queries + 128 passages: at most 17k tokens). Once a run has chunked
    (chunked_before) it goes on chunking: an epoch's last, smaller micro-batch (SciFact: 23 queries, 24k tokens)
    would otherwise run plain just under the budget and set the run's peak (6.4 GB against 3.6). Training in fp32
    (a CPU without native bf16) keeps activations of twice the size, so the chunk and the budget are halved: the
    example file plain in fp32 peaked at 5.7 GB, in chunks of 16 at 1.7 GB. SciFact's 32 in-batch pairs (10k tokens)
    stay plain: 4.5 GB, against 2.7 in chunks of 16 at 1.2x the step's time (README, "Bounded by default"). CUDA:
    off unless asked."""
    if grad_cache >= 0:
        return grad_cache
    padded = sum(len(ids) * max(map(len, ids), default=0) for ids in inputs.values())  # each group pads to its longest
    chunk, budget = (AUTO_CHUNK // 2, AUTO_TOKENS_FP32) if fp32 else (AUTO_CHUNK, AUTO_TOKENS)
    return chunk if device_type == "cpu" and (padded > budget or chunked_before) else 0


def check(cfg: "TrainConfig") -> "TrainConfig":
    """The checks that involve several fields, before any work (each field's own range is checked as it is read)."""
    val = 0.0 if cfg.val else cfg.val_ratio  # a --val/--test file replaces the carved share
    test = 0.0 if cfg.test else cfg.test_ratio
    if val + test >= 1:
        raise UserError(f"--val-ratio {cfg.val_ratio} + --test-ratio {cfg.test_ratio} must be below 1: nothing "
                        f"would be left to train on")
    if cfg.merge_sweep and cfg.merge_ratio >= 0:
        raise UserError("pass --merge-sweep (choose a mix on validation) or --merge-ratio (a fixed mix), not both")
    if cfg.kd_weight > 0 and cfg.group_size < 2:
        raise UserError("--kd-weight distils over each query's positive and hard negatives: needs --group-size 2 or more")
    if cfg.distill_from and cfg.matryoshka_dims:
        # the embedding term compares full-width embeddings with the teacher's; a truncated student has no teacher
        raise UserError("--distill-from and --matryoshka-dims cannot be combined: the distillation terms compare "
                        "full-size embeddings with the teacher's; train the Matryoshka sizes without a teacher")
    return cfg


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def resolve_key(key: str, where: str) -> dataclasses.Field:
    """`temperature` or `loss.temperature` -> the field; anything else is an error."""
    section, _, name = key.rpartition(".")
    f = FIELDS.get(name.replace("-", "_"))
    if f is None or (section and section != f.metadata["section"]):
        raise UserError(f"{where}: unknown setting {key!r}")
    return f


def parse_setting(key: str, value, where: str) -> tuple[str, object]:
    """One setting as presets and sweeps give it (`epochs` or `optim.epochs`, a TOML or string value), checked and
    converted: (field name, typed value)."""
    f = resolve_key(key, where)
    return f.name, _convert(f, value, where)


def load_toml(path: str | Path) -> dict:
    """A preset's settings as {field: value}, sections flattened, every key and type checked."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"{path}: cannot read preset ({e})") from None
    out = {}
    for key, value in raw.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            f = resolve_key(f"{key}.{sub}" if sub else key, str(path))
            out[f.name] = _convert(f, v, str(path))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tune a BGE embedding model contrastively on a domain file.",
                                allow_abbrev=False, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a preset TOML file whose settings override the defaults")
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        section = f.metadata["section"]
        g = groups.setdefault(section, p.add_argument_group(section))
        flag = "--" + f.name.replace("_", "-")
        rng = f.metadata["range"]
        default = repr(f.default).replace("%", "%%")  # argparse formats help strings with %
        help_ = f"{f.metadata['help']} (default: {default}" + (f"; range {rng})" if rng else ")")
        if _field_type(f) is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        elif typing.get_origin(_field_type(f)) is tuple:
            g.add_argument(flag, dest=f.name, nargs="+", action="extend", metavar="PATH", help=help_)
        else:
            g.add_argument(flag, dest=f.name, metavar=_field_type(f).__name__.upper(), help=help_)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """The run's config and the names of the fields set explicitly (by preset or flag)."""
    ns = vars(build_parser().parse_args(argv))  # an unknown flag: argparse prints usage and exits 2
    values = load_toml(ns.pop("config")) if "config" in ns else {}
    for name, v in ns.items():
        values[name] = _convert(FIELDS[name], v, "--" + name.replace("_", "-"))
    return check(TrainConfig(**values)), set(values)


def config_from_dict(d: dict, where: str) -> TrainConfig:
    """A TrainConfig from a run folder's config.json, checked like a preset."""
    return check(TrainConfig(**{resolve_key(k, where).name: _convert(resolve_key(k, where), v, where)
                                for k, v in d.items()}))


def as_flags(cfg: TrainConfig) -> list[str]:
    """The command-line flags that give `cfg` (its fields that differ from the defaults): parse_args(as_flags(cfg))
    is cfg again."""
    argv = []
    for name, f in FIELDS.items():
        value, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            argv += [flag, *value] if isinstance(value, tuple) else [flag, str(value)]
    return argv
