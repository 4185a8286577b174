"""Fine-tune a BGE embedding model on a domain file (retrieval, STS pairs, classification rows, or a mix), then
show how the held-out test set changed.

    python train.py --data examples/bike_repair.jsonl
    python train.py --data ../shared/data/scifact --split train --model BAAI/bge-small-en-v1.5
    python train.py --data ../shared/data/stsb/sts-train.tsv --test ../shared/data/stsb/sts-dev.tsv
    python train.py --data examples/bike_tickets.jsonl
    python train.py --resume checkpoints/<run>

Read top to bottom: set-up, data, model, the loop (step, validate, save), the ending (base vs fine-tuned on
the held-out test set, and diagnostics for retrieval). Every knob is a field of bge.config.TrainConfig and a
--flag. What differs by task (the micro-batch, its loss, the metrics) lives in bge/tasks.py.
"""
from __future__ import annotations

import functools
import json
import math
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from rich.progress import TextColumn
from rich.table import Table

from bge import __version__, card, diagnostics, distributed, packing, plot, rundir
from bge.batching import Prefetcher
from bge.checkpoint import atomic_write_text, json_text, restore_state, save_state
from bge.config import TrainConfig, config_from_dict, parse_args
from bge.console import console, progress, run_cli
from bge.distill import Teacher
from bge.embedder import Embedder, native_cpu_bf16
from bge.errors import UserError
from bge.evaluation import CorpusCache, evaluate_probe, load_eval_data
from bge.loss import LossFn, l1_penalty, matryoshka
from bge.lstm import BiLSTMEncoder
from bge.merge import choose_ratio, merged_embedder, parse_ratios
from bge.optim import decayed, default_lr, freeze, get_lr, make_optimizer, param_groups, step_if
from bge.runs import Stopwatch
from bge.step import forward_backward, make_embed
from bge.tasks import TaskSampler, cache_folder, export, labelled, load_tasks, metric_label, missing_sets, validate
from bge.tracking import open_tracker

REPO = Path(__file__).resolve().parent
RESUMABLE_OVERRIDES = {"epochs", "max_steps", "cache_dir", "patience", "eval_every", "save_every", "device", "compile",
                       "eval_batch_size", "resume", "explain", "threshold_precision", "log_every", "compile_mode",
                       "report_to"}  # what may change when a run continues


# ---- set-up helpers ----------------------------------------------------------------------------------
def load_student(cfg: TrainConfig, device: torch.device) -> Embedder:
    """--model as it is (a transformer, or a saved BiLSTM with --arch bilstm), or with --arch bilstm a new BiLSTM
    that takes --model's tokenizer and word embeddings; then --freeze-* and --grad-checkpointing."""
    embedder = Embedder.load(cfg.model, device=device, query_prompt=None if cfg.query_prompt == "auto" else cfg.query_prompt)
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
    return embedder


def load_teacher(cfg: TrainConfig, device: torch.device, student_dim: int, cpu_bf16: bool) -> Teacher | None:
    """The --distill-from model, frozen, with its embedding cache (on disk in the cache folder); None without
    --distill-from."""
    if not cfg.distill_from:
        return None
    teacher = Teacher(Embedder.load(cfg.distill_from, device=device), max_query_length=cfg.max_query_length,
                      max_passage_length=cfg.max_passage_length, cpu_bf16=cpu_bf16, batch_size=cfg.eval_batch_size,
                      store=cache_folder(cfg))
    if cfg.distill_loss != "none" and cfg.distill_weight and teacher.dim != student_dim:
        raise UserError(f"--distill-from {cfg.distill_from} embeds in {teacher.dim} dimensions, the student in "
                        f"{student_dim}: set --lstm-dim {teacher.dim}, or --distill-loss none (KL term only)")
    return teacher


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


def git_commit() -> str:
    """The commit of the checkout train.py runs from (-dirty if changed), whatever the working directory; an
    installed copy is no checkout (it may sit inside another one, a venv in a repo): its package version."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() == REPO:
            return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"unknown (not a git checkout: bge-finetune {__version__})"


def results_table(title: str, base: dict, tuned: dict, metrics: tuple[str, ...], merged: dict | None = None,
                  ratio: float | None = None) -> Table:
    """Metrics as rows; base, fine-tuned (and the base/fine-tuned mix) as columns, with changes from base."""
    table = Table(title=title)
    columns = ["metric", "base", "fine-tuned", "change"] + ([f"merged {ratio:g}", "change"] if merged else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "metric" else "right")

    def change(d: float) -> str:
        style = "green" if d > 0 else "red" if d < 0 else ""
        return f"[{style}]{d:+.4f}[/]" if style else f"{d:+.4f}"

    for m in metrics:
        if math.isnan(base[m]):  # a metric the base model has not got (a trained classification head)
            table.add_row(m, "-", f"{tuned[m]:.4f}", "", *([f"{merged[m]:.4f}", ""] if merged else []))
            continue
        cells = [f"{base[m]:.4f}", f"{tuned[m]:.4f}", change(tuned[m] - base[m])]
        if merged:
            cells += [f"{merged[m]:.4f}", change(merged[m] - base[m])]
        table.add_row(m, *cells)
    return table


# ---- the run -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    with rundir.held():  # the run folder is released however the run ends; a failed start leaves no folder behind
        run(argv)


def run(argv: list[str] | None = None) -> None:
    clock = Stopwatch()  # this process's wall time by phase: results.json's `timing`
    cfg, explicit = parse_args(argv)
    if cfg.attention == "varlen" and (not cfg.packed or cfg.arch != "bert"):
        raise UserError("--attention varlen is a layout of the transformer's packed path: pass --packed (and --arch bert)")
    if cfg.token_bucket and not (cfg.packed and cfg.attention == "varlen"):
        raise UserError("--token-bucket pads the varlen layout: pass --packed --attention varlen")
    info = distributed.init(cfg.device)  # one process per device under torchrun; else a single one
    console.quiet = not info.main  # rank 0 speaks for all
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume {run_dir}: not a run folder (no config.json)")
        changed = explicit - RESUMABLE_OVERRIDES
        if changed:
            raise UserError(f"--resume continues the saved config; cannot change {', '.join(sorted(changed))}")
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = config_from_dict({**saved, **{k: getattr(cfg, k) for k in explicit}}, str(run_dir / "config.json"))
        rundir.check_resume(run_dir, info.world)
        claim = rundir.claim(run_dir, fresh=False) if info.main else None
        for note in rundir.recover_exports(run_dir) if info.main else []:
            console.print(f"[yellow]{note}[/]")
    else:
        if not cfg.data:
            raise UserError("--data is required (a FlagEmbedding-format JSONL, an STS TSV, or a BEIR folder)")
        if not Path(cfg.data).exists():
            raise UserError(f"--data {cfg.data}: no such file or folder")
        name = distributed.broadcast(cfg.run_name or f"{Path(cfg.data).stem}-{datetime.now():%Y%m%d-%H%M%S}", info)
        run_dir = Path(cfg.out_dir) / name
        claim = rundir.claim(run_dir, fresh=True) if info.main else None  # one run per folder, locked
        if info.main:
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            atomic_write_text(run_dir / "command.txt", shlex.join([sys.executable, *sys.argv]) + "\n")
            atomic_write_text(run_dir / "git.txt", git_commit() + "\n")
        distributed.barrier(info)
    device = info.device
    tracker = open_tracker(cfg.report_to, run_dir) if info.main else None  # TensorBoard: its package checked now
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed + info.rank)  # each rank its own dropout masks
    cross_device = info.enabled and cfg.cross_device_negatives
    if cross_device and cfg.symmetric:
        raise UserError("--symmetric is not supported with cross-device negatives; pass --no-cross-device-negatives")

    # data
    tasks, split = load_tasks(cfg, run_dir, write=info.main)
    console.print(f"run {run_dir}: " + "; ".join(t.describe() for t in tasks.values()))
    for note in (n for t in tasks.values() for n in t.notes):
        console.print(note)
    has_val = any(t.val is not None for t in labelled(tasks).values())
    missing = missing_sets(labelled(tasks), cfg)
    for task, part, why in missing:
        then = "nothing is validated, best/ is the last step's model" if part == "validation" else "no test table"
        console.print(f"[yellow]{task}: no {part} set[/] ({why}): {then}")
    if cfg.patience and not has_val:
        raise UserError("--patience stops when validation stops improving; this run has no validation set")
    probe = load_eval_data(cfg.general_probe, cfg.probe_split, cfg.title) if cfg.general_probe else None
    merge_ratios = parse_ratios(cfg.merge_sweep) if cfg.merge_sweep else []
    if merge_ratios and not has_val:
        raise UserError("--merge-sweep chooses a mix on the validation set; there is none (--val-ratio 0?)")
    if cfg.kd_weight > 0:
        retrieval = tasks.get("retrieval")
        if retrieval is None or not all(ex.neg and ex.pos_scores and ex.neg_scores for ex in retrieval.train):
            raise UserError("--kd-weight needs hard negatives with teacher scores (pos_scores, neg_scores) on every "
                            "training line; python -m bge.score --teacher MODEL fills them")
    matryoshka_dims = [int(d) for d in cfg.matryoshka_dims.split(",") if d.strip()] if cfg.matryoshka_dims else []

    # model
    embedder = load_student(cfg, device)
    model, tokenizer = embedder.model, embedder.tokenizer
    model.set_dropout(cfg.hidden_dropout, cfg.attention_dropout)
    head = None  # the linear head of --classification-loss head/both, trained with the encoder
    if "classification" in tasks and cfg.classification_loss != "contrastive":
        head = tasks["classification"].make_head(model.dim, device)
    if not all(0 < d <= model.dim for d in matryoshka_dims):
        raise UserError(f"--matryoshka-dims {cfg.matryoshka_dims}: sizes must be between 1 and {model.dim}")
    if matryoshka_dims and head is not None:
        raise UserError("--matryoshka-dims truncates the embeddings a classification head reads; use one or the other")
    amp_dtype, scaler = precision(cfg, device)
    if head is not None and info.enabled:
        raise UserError("--classification-loss head/both is single-process for now; use contrastive under torchrun")
    net = distributed.wrap(model, info)  # DDP under torchrun: gradients averaged over ranks
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
    cpu_bf16 = device.type == "cpu" and amp_dtype == torch.bfloat16  # evaluate in the arithmetic we train in
    retrieval = tasks.get("retrieval")
    if cfg.mine_negatives and retrieval is not None and not any(ex.neg for ex in retrieval.train):
        retrieval.mine_negatives(embedder, cpu_bf16)  # the base model: before any step, and again (cached) on resume
        console.print(retrieval.notes[-1])
    teacher = load_teacher(cfg, device, model.dim, cpu_bf16)
    if teacher is not None:
        if "retrieval" not in tasks:
            raise UserError("--distill-from distils on query/passage batches; --data has no retrieval lines")
        tasks["retrieval"].teacher = teacher  # its loss adds the distillation terms
        if "corpus" in tasks:
            tasks["corpus"].teacher = teacher  # the --distill-corpus stage's only target
            if cfg.distill_corpus == "data":  # its passages are the evaluation corpus: kept by the teacher's own test?
                corpus = tasks["retrieval"].full.corpus
                n = teacher.preload(corpus, CorpusCache(cache_folder(cfg)))
                console.print(f"teacher: {n:,} of {len(corpus):,} passage embeddings read from the corpus cache")

    # optimisation
    lr = cfg.lr or default_lr(model.dim, cfg.arch)
    sampler = TaskSampler(tasks, cfg.batch_size * info.world, cfg.seed, min_size=info.world,  # global batches
                          stage_steps=cfg.distill_corpus_steps, grad_accum=cfg.grad_accum)
    steps_per_epoch = max(1, len(sampler) // cfg.grad_accum)  # of the labelled data, after any --distill-corpus stage
    total_steps = sampler.stage_steps + (cfg.max_steps or steps_per_epoch * cfg.epochs)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or eval_every
    optimizer = make_optimizer(model, lr=lr, weight_decay=cfg.weight_decay,
                               extra=param_groups(head, cfg.weight_decay, cfg.head_lr / lr) if head else ())
    l1_params = decayed(model) + (decayed(head) if head else [])
    trained = model if head is None else torch.nn.ModuleDict({"encoder": model, "head": head})  # what state/ holds

    # state: fresh, or restored from the last complete save
    trainer = {"step": 0, "micro_step": 0, "best": None, "best_step": None, "stale_evals": 0, "bad_steps": 0,
               "bad_steps_total": 0, "train_seconds": 0.0, "tokens": 0, "base_val": None, "best_val": None,
               "stopped": False, "world": info.world}
    restored = restore_state(run_dir, trained, optimizer, rank=info.rank, scaler=scaler) if cfg.resume else None
    if restored is not None:
        trainer.update(restored[0])
        console.print(f"resumed from {restored[1]} at step {trainer['step']}")
    schedule_steps, warmup_steps = rundir.fixed_schedule(trainer, total_steps, warmup_steps, cfg.schedule)
    metrics_path = run_dir / "metrics.jsonl"
    if cfg.resume and info.main:  # forget what was logged after the state we resume from
        rundir.trim_metrics(metrics_path, trainer["step"] if restored else None)
    log = open(metrics_path, "a", encoding="utf-8") if info.main else None

    def log_line(record: dict) -> None:
        if log:
            log.write(json_text(record, indent=None) + "\n")
            log.flush()
        if tracker:
            tracker.log(record)

    def probe_scores(m: Embedder) -> dict[str, float]:
        """probe/<metric> on the --general-probe set: how much general ability the model keeps."""
        if probe is None:
            return {}
        scores = evaluate_probe(m, probe, batch_size=cfg.eval_batch_size, max_length=cfg.max_passage_length,
                                query_max_length=cfg.max_query_length, cpu_bf16=cpu_bf16)
        return {f"probe/{k}": v for k, v in scores.items()}

    def validation_scores(m: Embedder) -> dict[str, float]:
        """val/<metric> of every task (bge.tasks.validate), val/score (what chooses best/) and probe/<metric>."""
        with clock("validation"):
            scores, score = validate(tasks, m, cpu_bf16)
            return {f"val/{k}": v for k, v in scores.items()} | {"val/score": score} | probe_scores(m)

    def evaluate_and_keep_best(step: int) -> bool:
        """Validate (rank 0; the others wait); export best/ when the task's metric (bge.tasks.validate) improves;
        True when patience has run out."""
        if not has_val:
            return False
        if not info.main:
            return distributed.broadcast(False, info)
        scores = validation_scores(embedder)
        score = scores["val/score"]
        log_line({"step": step, **scores})
        if step == 0:
            trainer["base_val"] = scores
        if not math.isnan(score) and (trainer["best"] is None or score > trainer["best"]):  # NaN: no ranking
            trainer.update(best=score, best_step=step, stale_evals=0, best_val=scores)
            with clock("export"):
                export(embedder, tasks, run_dir / "best")
        else:
            trainer["stale_evals"] += 1
        probe_note = next((f" · {k} {v:.4f}" for k, v in scores.items() if k.startswith("probe/")), "")  # headline
        best = "none yet" if trainer["best"] is None else f"{trainer['best']:.4f} at step {trainer['best_step']}"
        console.print(f"step {step}: val {metric_label(tasks)} {score:.4f} (best {best})" + probe_note)
        return distributed.broadcast(cfg.patience > 0 and trainer["stale_evals"] >= cfg.patience, info)

    if trainer["step"] == 0 and trainer["best"] is None:
        evaluate_and_keep_best(0)  # the base model is the first candidate for best/

    def build(micro_step: int) -> tuple[int, str, dict[str, list[list[int]]], LossFn]:
        """Micro-batch number micro_step, tokenised, and its loss: a pure function of it, so it can be built ahead.
        Its task decides what the batch holds and which loss applies (bge/tasks.py); under torchrun each rank
        takes its shard of the global batch, and retrieval puts every rank's passages in each softmax."""
        epoch, task_name, indices = sampler.batch(micro_step)
        return epoch, task_name, *tasks[task_name].micro_batch(distributed.shard(indices, info), epoch, tokenizer,
                                                               device, info if cross_device else None)

    # ---- the loop ----------------------------------------------------------------------------------
    # Nothing in a step waits for the device: its loss, accuracy and NaN flag stay there, and every log_every steps
    # (and before validating or saving) one read-back logs them all; a non-finite step is skipped on the device
    batches = Prefetcher(build, trainer["micro_step"])  # tokenisation off the critical path
    model.train()
    log_every = cfg.log_every or (10 if device.type == "cuda" else 1)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead"
    stats = TextColumn("loss {task.fields[loss]:.4f} · acc {task.fields[acc]:.2f} · lr {task.fields[lr]:.2e} · "
                       "{task.fields[tps]:,.0f} tok/s")
    stop = trainer["stopped"]  # an early stop is part of the state: a resumed stopped run does not train on
    if stop:
        console.print(f"this run stopped early at step {trainer['step']} (--patience); nothing left to train")
    if claim:
        claim.start()
    clock.enter("train")
    with progress(stats) as bar:
        task = bar.add_task("training", total=total_steps, completed=trainer["step"], loss=0.0, acc=0.0, lr=0.0, tps=0.0)
        pending = []  # (step, epoch, task, lr, tokens, [loss, acc, finite] on the device) not read back yet

        def read_back() -> None:
            """Log the pending steps in order (the loop's only wait for the device); stop a run that keeps failing."""
            rows = distributed.all_mean(torch.stack([v for *_, v in pending]), info).tolist()
            seconds, tokens = time.perf_counter() - since, sum(r[4] for r in pending)
            trainer["train_seconds"] += seconds
            trainer["tokens"] += tokens
            for (step, epoch, task_name, lr_now, _, _), (loss, acc, finite) in zip(pending, rows):
                if finite:
                    trainer["bad_steps"] = 0
                else:  # skipped on the device; count it, and give up when it keeps happening
                    trainer["bad_steps"] += 1
                    trainer["bad_steps_total"] += 1
                    if trainer["bad_steps"] >= cfg.max_bad_steps:
                        raise UserError(f"the loss was NaN/inf for {cfg.max_bad_steps} steps in a row (step {step}); "
                                        f"try a lower --lr, --precision fp32, or check the data")
                log_line({"step": step, "epoch": epoch, "task": task_name, "loss": loss, "acc": acc, "lr": lr_now,
                          "tokens_per_s": tokens / seconds, "skipped": not finite})
            bar.update(task, completed=step, loss=loss, acc=acc, lr=lr_now, tps=tokens / seconds)
            pending.clear()

        while trainer["step"] < total_steps and not stop:
            if not pending:  # just read back (and perhaps validated or saved): the training clock starts here
                since = time.perf_counter()
            values = torch.zeros(2, dtype=torch.float64, device=device)  # loss, accuracy: means over micro-batches
            finite, tokens = torch.ones((), dtype=torch.bool, device=device), 0
            for micro in range(cfg.grad_accum):
                epoch, task_name, inputs, loss_fn = batches.get(trainer["micro_step"])
                tokens += sum(len(x) for ids in inputs.values() for x in ids)
                if matryoshka_dims:  # the same loss again on each truncated, renormalised size
                    loss_fn = functools.partial(matryoshka, loss_fn, dims=matryoshka_dims)
                scale = (scaler.get_scale() if scaler else 1.0) / cfg.grad_accum
                if graphs:  # the CUDA graphs' outputs from the last micro-step may be overwritten from here on
                    torch.compiler.cudagraph_mark_step_begin()
                loss, stats = forward_backward(embed, inputs, loss_fn, chunk_size=cfg.grad_cache, loss_scale=scale,
                                               device=device, no_sync=net.no_sync if net else None,
                                               sync=micro == cfg.grad_accum - 1, together=varlen, skip_nonfinite=False)
                finite &= torch.isfinite(loss)
                values += torch.stack([loss, stats["acc"].to(loss.device)]).double() / cfg.grad_accum
                trainer["micro_step"] += 1
            finite = distributed.all_true(finite, info)

            lr_now = get_lr(trainer["step"], lr=lr, warmup_steps=warmup_steps, total_steps=schedule_steps,
                            schedule=cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr_now * group.get("lr_scale", 1.0)
            # a non-finite step's gradients are NaN/inf: whatever l1 and clipping do to them, the update skips them
            if cfg.l1 > 0:  # once per optimiser step, on the scale the loss gradients are on
                (l1_penalty(l1_params) * cfg.l1 * (scaler.get_scale() if scaler else 1.0)).backward()
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.clip_grad)
            if scaler:  # skips steps with non-finite gradients itself (and lowers its scale)
                scaler.step(optimizer)
                scaler.update()
            else:
                step_if(optimizer, finite)
            optimizer.zero_grad(set_to_none=True)
            trainer["step"] += 1
            step = trainer["step"]
            pending.append((step, epoch, task_name, lr_now, tokens, torch.cat([values, finite.double()[None]])))

            evaluate = step % eval_every == 0 or step in (sampler.stage_steps, total_steps)  # the stage's end too
            save = step % save_every == 0 or step in (sampler.stage_steps, total_steps)
            if step % log_every == 0 or evaluate or save:
                read_back()
            if evaluate:
                stop = trainer["stopped"] = evaluate_and_keep_best(step)
                if stop:
                    console.print(f"early stop: no improvement in {cfg.patience} validations")
            if save or stop:
                if teacher is not None:  # the rows computed up to this state: a resumed run reads them, not recomputes
                    teacher.flush()
                rng = distributed.rng_states(info)  # every rank's dropout RNG, for an exact resume
                if info.main:
                    with clock("checkpoint"):
                        save_state(run_dir, step, trained, optimizer, trainer, rng=rng, scaler=scaler)
                distributed.barrier(info)
    if not info.main:  # rank 0 exports and evaluates; the others are done
        distributed.shutdown(info)
        return
    log.close()
    if tracker:
        tracker.close()
    clock.enter("test")  # the ending: the test set (and the merge sweep's validation and the exports, timed apart)
    with clock("export"):
        export(embedder, tasks, run_dir / "final")
        if trainer["best"] is None:  # nothing to choose by: the last weights are the best we know
            export(embedder, tasks, run_dir / "best")

    # ---- the forgetting guard: base and fine-tuned weights mixed (LM-Cocktail), chosen on validation -----
    judged = labelled(tasks)  # what is validated and reported: not --unlabeled's pseudo-pairs
    first = next(iter(judged.values()))
    best_key = first.metric if len(judged) == 1 else "mean"
    results = {"run": str(run_dir), "config": cfg.to_dict(), "best_step": trainer["best_step"], f"best_val_{best_key}": trainer["best"],
               "steps": trainer["step"], "train_seconds": trainer["train_seconds"], "skipped_steps": trainer["bad_steps_total"],
               **{f"train_{'queries' if t.name == 'retrieval' else t.name}": len(t.train) for t in tasks.values()}}
    base = Embedder.load(cfg.model, device=device, query_prompt=tokenizer.query_prompt)
    tuned = Embedder.load(str(run_dir / "best"), device=device)
    merged, ratio = None, (cfg.merge_ratio if cfg.merge_ratio >= 0 else None)
    sweep: dict[float, dict[str, float]] = {}
    if merge_ratios:
        # both ends were validated during training (a state saved by an older version lacks them)
        sweep = {0.0: trainer["base_val"] or validation_scores(base), 1.0: trainer["best_val"] or validation_scores(tuned)}
        for r in merge_ratios:
            if r not in sweep:
                sweep[r] = validation_scores(merged_embedder(base, tuned, r))
                console.print(f"merged at {r:g}: " + " · ".join(f"{k} {v:.4f}" for k, v in sweep[r].items()
                                                                 if k == "val/score" or k.startswith("probe/")))
        headline = next((k for k in sweep[0.0] if k.startswith("probe/")), None)
        ratio = choose_ratio({r: s["val/score"] for r, s in sweep.items()},
                             {r: s[headline] for r, s in sweep.items()} if headline else None, cfg.probe_tolerance)
        console.print(f"merge sweep: chose ratio {ratio:g} (best validation {metric_label(tasks)} with "
                      f"{headline or 'no probe'} at most {cfg.probe_tolerance} below the base model's)")
        results["merge_sweep"] = {f"{r:g}": s for r, s in sorted(sweep.items())}
    if ratio is not None:
        merged = merged_embedder(base, tuned, ratio)
        with clock("export"):
            export(merged, tasks, run_dir / "merged")
        results["merge_ratio"] = ratio

    # ---- the ending: base vs fine-tuned (and merged) on the held-out test set and the probe --------------
    # the probe was scored when each of these models was validated (base at step 0, best/ at its step): reuse it
    validated = {"base": trainer["base_val"], "fine_tuned": trainer["best_val"], "merged": sweep.get(ratio)}
    probe_rows = {name: {k: v for k, v in (validated[name] or {}).items() if k.startswith("probe/")} or probe_scores(m)
                  for name, m in (("base", base), ("fine_tuned", tuned), ("merged", merged)) if m}
    per_task, tables = {}, []  # the base-vs-fine-tuned tables come last, after the diagnostics that explain them
    for job in (t for t in tasks.values() if t.test_data is not None):
        r = job.test(base, tuned, cpu_bf16, run_dir / "best")
        b, t = r.base | probe_rows["base"], r.fine_tuned | probe_rows["fine_tuned"]
        m = job.test_scores(merged, cpu_bf16, run_dir / "merged") | probe_rows["merged"] if merged else None
        tables.append(results_table(f"{job.name} · {r.title}", b, t, (*job.table_metrics, *probe_rows["base"]), m, ratio))
        per_task[job.name] = {**r.counts, "base": b, "fine_tuned": t, "change": {k: t[k] - b[k] for k in b}}
        if m is not None:
            per_task[job.name].update(merged=m, merged_change={k: m[k] - b[k] for k in b})
        if r.comparison is not None:  # why it changed: wins and losses, score scales, a threshold for each
            console.rule("diagnostics: base vs fine-tuned on the held-out test queries")
            for renderable in diagnostics.render(r.comparison, job.test_data.corpus):
                console.print(renderable)
            png = diagnostics.plot_score_distributions(r.comparison.scores, run_dir / "scores.png", r.comparison.thresholds)
            if png:
                console.print(f"score distributions plotted in {png}")
            per_task[job.name]["diagnostics"] = r.comparison.to_dict()
    for table in tables:
        console.print(table)
    no_test = {task: why for task, part, why in missing if part == "test"}
    if no_test:  # said in results.json too, so that a missing table is not read as a lost one
        results["no_test_set"] = no_test
    if per_task:
        results.update(per_task[first.name] if len(judged) == 1 else {"tasks": per_task})
    elif probe is not None:  # no test set: the probe alone
        console.print(results_table(f"general probe · {probe.name}", probe_rows["base"], probe_rows["fine_tuned"],
                                    tuple(probe_rows["base"]), probe_rows.get("merged"), ratio))
        results.update(probe_rows)
    results["timing"] = clock.report()  # seconds by phase (this process), peak RSS: benchmarks/run_time.py
    atomic_write_text(run_dir / "results.json", json_text(results) + "\n")  # NaN as null, with why
    card.fill_results(run_dir, results)  # the test table into best/'s and merged/'s model cards
    plot.after_run(run_dir)  # curves.png, or text sparklines without matplotlib
    console.print(f"wrote {run_dir / 'results.json'}; fine-tuned model in {run_dir / 'best'}")
    distributed.shutdown(info)


if __name__ == "__main__":
    run_cli(main)
