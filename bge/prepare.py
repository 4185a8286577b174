"""A run's set-up before its first step, as bge.training.train calls it: what the data allows (said before any work),
the student (--arch, frozen parts, dropout, a classification head), the precision, the embed function the loop
calls (padded, packed or varlen; compiled or not), and the --distill-from teacher wired into the tasks it teaches.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

from bge import distributed, packing
from bge.config import TrainConfig
from bge.console import console
from bge.data import RetrievalData, STSData, load_eval_data
from bge.distill import Teacher
from bge.embedder import Embedder, native_cpu_bf16
from bge.errors import UserError
from bge.evaluation import CorpusCache
from bge.lstm import BiLSTMEncoder
from bge.optim import freeze
from bge.step import Embed, make_embed
from bge.tasks import Task, cache_folder, labelled, missing_sets


def check_layout(cfg: TrainConfig) -> None:
    """The flags that need another one or exclude one, refused before any work."""
    if cfg.attention == "varlen" and (not cfg.packed or cfg.arch != "bert"):
        raise UserError("--attention varlen is a layout of the transformer's packed path: pass --packed (and --arch bert)")
    if cfg.token_bucket and not (cfg.packed and cfg.attention == "varlen"):
        raise UserError("--token-bucket pads the varlen layout: pass --packed --attention varlen")
    if cfg.unlabeled_stage and cfg.unlabeled == "off":
        raise UserError("--unlabeled-stage trains on --unlabeled's pseudo-pairs first: pass --unlabeled title, ict or both")
    if cfg.unlabeled_stage and cfg.distill_corpus:  # TaskSampler runs one stage
        raise UserError("--unlabeled-stage and --distill-corpus are both a first stage: pass one of them")


def check_data(cfg: TrainConfig, tasks: dict[str, Task], run_dir: Path) -> tuple[bool, RetrievalData | STSData | None]:
    """Say what the run holds (each task's sizes and notes, a held-out set it lacks) and refuse what its data cannot
    do; (whether anything is validated, the --general-probe set or None)."""
    console.print(f"run {run_dir}: " + "; ".join(t.describe() for t in tasks.values()))
    for note in (n for t in tasks.values() for n in t.notes):
        console.print(note)
    has_val = any(t.val is not None for t in labelled(tasks).values())
    for task, part, why in missing_sets(labelled(tasks), cfg):
        then = "nothing is validated, best/ is the last step's model" if part == "validation" else "no test table"
        console.print(f"[yellow]{task}: no {part} set[/] ({why}): {then}")
    if cfg.patience and not has_val:
        raise UserError("--patience stops when validation stops improving; this run has no validation set")
    probe = load_eval_data(cfg.general_probe, cfg.probe_split, cfg.title) if cfg.general_probe else None
    if cfg.merge_sweep and not has_val:
        raise UserError("--merge-sweep chooses a mix on the validation set; there is none (--val-ratio 0?)")
    if cfg.remine:
        retrieval = tasks.get("retrieval")
        if retrieval is None or not retrieval.mining_groups():
            raise UserError("--remine mines again the negatives a run mines: it needs retrieval data without `neg` "
                            "and --mine-negatives above 0")
    if cfg.kd_weight > 0:
        retrieval = tasks.get("retrieval")
        if retrieval is None or not all(ex.neg and ex.pos_scores and ex.neg_scores for ex in retrieval.train):
            raise UserError("--kd-weight needs hard negatives with teacher scores (pos_scores, neg_scores) on every "
                            "training line; python -m bge.score --teacher MODEL fills them")
    return has_val, probe


NEW_QUERY_PROMPT = "query: "  # E5's prefix, for a model that states no instruction of its own (README: +1.7 SciFact)


def load_student(cfg: TrainConfig, device: torch.device, retrieval: bool) -> tuple[Embedder, str, str]:
    """(the model to train, the base's own query instruction, the base's own passage instruction). The model:
    --model as it is (a transformer, or a saved BiLSTM with --arch bilstm), or with --arch bilstm a new BiLSTM that
    takes --model's tokenizer and word embeddings; then --freeze-*, --grad-checkpointing and the dropout. Its queries
    take --query-prompt; 'auto' is the model's own instruction, or, when training retrieval on a pretrained
    transformer that states none (all-MiniLM-L6-v2), E5's `query: `: a marker that lets queries and passages part
    where the base embeds them alike. Its passages take --passage-prompt; 'auto' is the model's own (none for most)."""
    embedder = Embedder.load(cfg.model, device=device)
    tokenizer = embedder.tokenizer
    own_query, own_passage = tokenizer.query_prompt, tokenizer.passage_prompt
    if cfg.query_prompt != "auto":
        tokenizer.query_prompt = cfg.query_prompt
    elif retrieval and cfg.arch == "bert" and not tokenizer.prompt_stated:  # measured on a pretrained transformer
        tokenizer.query_prompt = NEW_QUERY_PROMPT
    if cfg.passage_prompt != "auto":
        tokenizer.passage_prompt = cfg.passage_prompt
    if isinstance(embedder.model, BiLSTMEncoder) and cfg.arch != "bilstm":
        raise UserError(f"--model {cfg.model} is a BiLSTM; pass --arch bilstm to train it")
    if cfg.arch == "bilstm" and not isinstance(embedder.model, BiLSTMEncoder):
        lstm = BiLSTMEncoder.from_encoder(embedder.model, hidden_size=cfg.lstm_hidden, num_layers=cfg.lstm_layers,
                                          dim=cfg.lstm_dim, dropout=cfg.lstm_dropout, embed_dim=cfg.lstm_embed_dim,
                                          embed_init=cfg.lstm_embed_init, highway=cfg.lstm_highway,
                                          pooling=cfg.lstm_pooling)
        embedder = Embedder(lstm, embedder.tokenizer, name=f"bilstm({embedder.name})", device=device)
    if cfg.freeze_embeddings or cfg.freeze_layers:
        n = freeze(embedder.model, embeddings=cfg.freeze_embeddings, layers=cfg.freeze_layers)
        console.print(f"frozen: {n:,} of {sum(p.numel() for p in embedder.model.parameters()):,} parameters")
    embedder.model.grad_checkpointing = cfg.grad_checkpointing
    embedder.model.set_dropout(cfg.hidden_dropout, cfg.attention_dropout)
    return embedder, own_query, own_passage


def make_head(cfg: TrainConfig, tasks: dict[str, Task], dim: int, device: torch.device,
              info: distributed.DistInfo) -> nn.Linear | None:
    """The linear head of --classification-loss head/both, trained with the encoder; None without one."""
    if "classification" not in tasks or cfg.classification_loss == "contrastive":
        return None
    if cfg.matryoshka_dims:
        raise UserError("--matryoshka-dims truncates the embeddings a classification head reads; use one or the other")
    if info.enabled:
        raise UserError("--classification-loss head/both is single-process for now; use contrastive under torchrun")
    return tasks["classification"].make_head(dim, device)


def matryoshka_dims(cfg: TrainConfig, dim: int) -> list[int]:
    """The truncated sizes --matryoshka-dims trains, each at most the model's."""
    dims = [int(d) for d in cfg.matryoshka_dims.split(",") if d.strip()] if cfg.matryoshka_dims else []
    if not all(0 < d <= dim for d in dims):
        raise UserError(f"--matryoshka-dims {cfg.matryoshka_dims}: sizes must be between 1 and {dim}")
    return dims


def precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None for fp32, GradScaler for fp16 only)."""
    choice = cfg.precision
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            choice = "bf16" if native_cpu_bf16() else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return dtype, (torch.amp.GradScaler("cuda") if choice == "fp16" else None)


def embed_function(cfg: TrainConfig, embedder: Embedder, net: nn.Module | None, device: torch.device,
                   amp_dtype: torch.dtype | None) -> tuple[Embed, bool]:
    """(the function a step embeds its token-id groups with, whether it takes them together as one varlen pack):
    --packed, --attention and --compile applied."""
    model, tokenizer = embedder.model, embedder.tokenizer
    if cfg.attention == "flex" and (device.type != "cuda" or not cfg.packed):
        raise UserError("--attention flex needs CUDA and --packed (FlexAttention has no backward on CPU)")
    model.attention = cfg.attention
    # the BiLSTM's packed layout (PackedSequence) pays on CUDA (cuDNN) but runs token by token on CPU, while its
    # padded layout is exact too (bge/lstm.py): padding never reaches a real token's state either way
    packed = cfg.packed and (cfg.arch == "bert" or device.type == "cuda")
    # varlen: packed on the host; a padded bucket reports the longest text any task may have as its max_len
    varlen = cfg.packed and cfg.attention == "varlen"
    longest = min(max(cfg.max_query_length, cfg.max_passage_length), tokenizer.position_limit)
    pack = functools.partial(packing.pack, pad_id=tokenizer.pad_id, multiple=cfg.token_bucket, max_length=longest)
    embed = make_embed(net or model.embed, tokenizer.pad, device, amp_dtype=amp_dtype, compile=cfg.compile,
                       compile_mode=cfg.compile_mode, packed=packed, pack=pack if varlen else None)
    return embed, varlen


def load_teacher(cfg: TrainConfig, tasks: dict[str, Task], device: torch.device, student_dim: int,
                 cpu_bf16: bool) -> Teacher | None:
    """The --distill-from model, frozen, with its embedding cache (on disk in the cache folder), set as the target of
    the retrieval task (and of the --distill-corpus stage); None without --distill-from."""
    if not cfg.distill_from:
        return None
    teacher = Teacher(Embedder.load(cfg.distill_from, device=device), max_query_length=cfg.max_query_length,
                      max_passage_length=cfg.max_passage_length, cpu_bf16=cpu_bf16, batch_size=cfg.eval_batch_size,
                      store=cache_folder(cfg))
    if cfg.distill_loss != "none" and cfg.distill_weight and teacher.dim != student_dim:
        raise UserError(f"--distill-from {cfg.distill_from} embeds in {teacher.dim} dimensions, the student in "
                        f"{student_dim}: set --lstm-dim {teacher.dim}, or --distill-loss none (KL term only)")
    if "retrieval" not in tasks:
        raise UserError("--distill-from distils on query/passage batches; --data has no retrieval lines")
    tasks["retrieval"].teacher = teacher  # its loss adds the distillation terms
    if "corpus" in tasks:
        tasks["corpus"].teacher = teacher  # the --distill-corpus stage's only target
        if cfg.distill_corpus == "data":  # its passages are the evaluation corpus: kept by the teacher's own test?
            corpus = tasks["retrieval"].full.corpus
            n = teacher.preload(corpus, CorpusCache(cache_folder(cfg)))
            console.print(f"teacher: {n:,} of {len(corpus):,} passage embeddings read from the corpus cache")
    return teacher
