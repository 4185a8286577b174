"""A training run, read top to bottom: set-up, the loop (step, validate, save, log), the ending. The Python API:

    from bge import TrainConfig, train
    result = train(TrainConfig(data="examples/bike_repair.jsonl", epochs=1))
    result.results["change"]["ndcg@10"], result.run_dir        # results.json's contents, the run folder

train.py (the CLI, `bge-train`) parses its flags into a TrainConfig and calls the same function. Every knob is a field
of bge.config.TrainConfig; what differs by task (the micro-batch, its loss, the metrics) lives in bge/tasks.py; the
set-up's pieces in bge/prepare.py and bge/rundir.py; the ending (forgetting guard, test tables, results.json) in
bge/ending.py.
"""
from __future__ import annotations

import functools
import math
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import TextColumn

from bge import distributed, ending, malloc, prepare, rundir, tasks as task_types
from bge.batching import Prefetcher
from bge.checkpoint import restore_state, save_state
from bge.config import FIELDS, TrainConfig, as_flags, config_from_dict, grad_cache_chunk
from bge.console import console, progress
from bge.embedder import Embedder
from bge.errors import UserError
from bge.loss import LossFn, l1_penalty, matryoshka
from bge.optim import decayed, default_lr, get_lr, make_optimizer, param_groups, step_if
from bge.runs import Stopwatch
from bge.step import forward_backward
from bge.tasks import TaskSampler, export, load_tasks, metric_label
from bge.tracking import MetricsLog, open_tracker


@dataclass
class TrainResult:
    """What a run leaves: results.json's contents ({} on a torchrun rank other than 0) and its folder."""

    results: dict
    run_dir: Path


def train(cfg: TrainConfig, explicit: set[str] | None = None, command: str | None = None) -> TrainResult:
    """Train as cfg says and test base vs fine-tuned. `explicit`: the fields the caller set (what --resume may
    override); default: those that differ from TrainConfig's defaults. `command`: command.txt's line (default: the
    equivalent bge-train command). The run folder is released however the run ends; a failed start leaves none."""
    cfg = config_from_dict(cfg.to_dict(), "TrainConfig")  # every field checked as a flag is
    if explicit is None:
        explicit = {name for name, f in FIELDS.items() if getattr(cfg, name) != f.default}
    with rundir.held():
        return run(cfg, explicit, command or shlex.join(["bge-train", *as_flags(cfg)]))


def run(cfg: TrainConfig, explicit: set[str], command: str) -> TrainResult:
    clock = Stopwatch()  # this process's wall time by phase: results.json's `timing`
    # ---- set-up: the run folder, the data, the model, the optimiser, the state -----------------------------------
    prepare.check_layout(cfg)
    info = distributed.init(cfg.device)  # one process per device under torchrun; else a single one
    console.quiet = not info.main  # rank 0 speaks for all
    cfg, run_dir, claim = rundir.open_run(cfg, explicit, info, command)  # a new folder, or --resume's saved config
    device = info.device
    tracker = open_tracker(cfg.report_to, run_dir) if info.main else None  # TensorBoard: its package checked now
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu" and cfg.malloc == "keep":  # CUDA tensors already live in torch's caching allocator
        console.print(malloc.keep_freed_memory(), style="dim", markup=False)  # what was done, or why not
    torch.manual_seed(cfg.seed + info.rank)  # each rank its own dropout masks
    cross_device = info.enabled and cfg.cross_device_negatives
    if cross_device and cfg.symmetric:
        raise UserError("--symmetric is not supported with cross-device negatives; pass --no-cross-device-negatives")

    tasks, _ = load_tasks(cfg, run_dir, write=info.main)
    has_val, probe = prepare.check_data(cfg, tasks, run_dir)

    embedder, base_query_prompt, base_passage_prompt = prepare.load_student(cfg, device, retrieval="retrieval" in tasks)
    base_prompts = base_query_prompt, base_passage_prompt  # the base's own instructions
    model, tokenizer = embedder.model, embedder.tokenizer
    matryoshka_dims = prepare.matryoshka_dims(cfg, model.dim)
    head = prepare.make_head(cfg, tasks, model.dim, device, info)  # --classification-loss head/both
    amp_dtype, scaler = prepare.precision(cfg, device)
    net = distributed.wrap(model, info)  # DDP under torchrun: gradients averaged over ranks
    embed, varlen = prepare.embed_function(cfg, embedder, net, device, amp_dtype)
    cpu_bf16 = device.type == "cpu" and amp_dtype == torch.bfloat16  # evaluate in the arithmetic we train in
    retrieval = tasks.get("retrieval")
    if retrieval is not None and retrieval.mining_groups():
        retrieval.mine_negatives(embedder, cpu_bf16)  # the base model: before any step, and again (cached) on resume
        console.print(retrieval.notes[-1])
    if retrieval is not None and (note := retrieval.bare_note()):
        console.print(note)
    teacher = prepare.load_teacher(cfg, tasks, device, model.dim, cpu_bf16)

    lr = cfg.lr or default_lr(model.dim, cfg.arch)
    sampler = TaskSampler(tasks, cfg.batch_size * info.world, cfg.seed, min_size=info.world,  # global batches
                          stage_steps=cfg.distill_corpus_steps, grad_accum=cfg.grad_accum)
    steps_per_epoch = max(1, len(sampler) // cfg.grad_accum)  # of the labelled data, after any first stage
    total_steps = sampler.stage_steps + (cfg.max_steps or steps_per_epoch * cfg.epochs)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or eval_every
    optimizer = make_optimizer(model, lr=lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_lr_decay,
                               extra=param_groups(head, cfg.weight_decay, cfg.head_lr / lr) if head else ())
    l1_params = decayed(model) + (decayed(head) if head else [])
    trained = model if head is None else torch.nn.ModuleDict({"encoder": model, "head": head})  # what state/ holds

    # state: fresh, or restored from the last complete save
    trainer = {"step": 0, "micro_step": 0, "best": None, "best_step": None, "stale_evals": 0, "bad_steps": 0,
               "bad_steps_total": 0, "train_seconds": 0.0, "tokens": 0, "base_val": None, "best_val": None,
               "stopped": False, "world": info.world, "negatives": None}
    restored = restore_state(run_dir, trained, optimizer, rank=info.rank, scaler=scaler) if cfg.resume else None
    if restored is not None:
        trainer.update(restored[0])
        console.print(f"resumed from {restored[1]} at step {trainer['step']}")
        if trainer["negatives"] is not None:  # --remine's, mined at the last epoch end before this state
            retrieval.use_negatives(trainer["negatives"])
    schedule_steps, warmup_steps = rundir.fixed_schedule(trainer, total_steps, warmup_steps, cfg.schedule)
    if cfg.resume and info.main:  # forget what was logged after the state we resume from
        rundir.trim_metrics(run_dir / "metrics.jsonl", trainer["step"] if restored else None)
    log = MetricsLog(run_dir / "metrics.jsonl" if info.main else None, tracker)

    def validation_scores(m: Embedder) -> dict[str, float]:
        """val/<metric> of every task, val/score (what chooses best/) and probe/<metric> (bge.tasks)."""
        with clock("validation"):
            return task_types.validation_scores(tasks, m, cpu_bf16, probe)

    def evaluate_and_keep_best(step: int) -> bool:
        """Validate (rank 0; the others wait); export best/ when the task's metric (bge.tasks.validate) improves;
        True when patience has run out."""
        if not has_val:
            return False
        if not info.main:
            return distributed.broadcast(False, info)
        scores = validation_scores(embedder)
        score = scores["val/score"]
        log({"step": step, **scores})
        if step == 0:  # the base's scores, kept where they are the base's as its users have it
            trainer["base_val"] = scores if (tokenizer.query_prompt, tokenizer.passage_prompt) == base_prompts else None
        if not math.isnan(score) and (trainer["best"] is None or score > trainer["best"]):  # NaN: no ranking
            trainer.update(best=score, best_step=step, stale_evals=0, best_val=trainer["base_val"] if step == 0 else scores)
            with clock("export"):
                export_best(step)
        else:
            trainer["stale_evals"] += 1
        probe_note = next((f" · {k} {v:.4f}" for k, v in scores.items() if k.startswith("probe/")), "")  # headline
        best = "none yet" if trainer["best"] is None else f"{trainer['best']:.4f} at step {trainer['best_step']}"
        console.print(f"step {step}: val {metric_label(tasks)} {score:.4f} (best {best})" + probe_note)
        return distributed.broadcast(cfg.patience > 0 and trainer["stale_evals"] >= cfg.patience, info)

    def export_best(step: int) -> None:
        """best/; at step 0 the base model as its users have it, with its own instructions: the untrained model with
        an instruction it never learnt (`auto`'s `query: `) is neither what they had nor what training made, and on
        data no step improves (PubMedQA) it tests below the base. Step 0 is validated with the run's instructions all
        the same: that is where training starts, and the trained steps are judged against it."""
        run_prompts = tokenizer.query_prompt, tokenizer.passage_prompt
        if step == 0:
            tokenizer.query_prompt, tokenizer.passage_prompt = base_prompts
        try:
            export(embedder, tasks, run_dir / "best")
        finally:
            tokenizer.query_prompt, tokenizer.passage_prompt = run_prompts

    if trainer["step"] == 0 and trainer["best"] is None:
        evaluate_and_keep_best(0)  # the base model is the first candidate for best/
        if info.main and has_val and trainer["best_step"] != 0:  # a NaN score: not best/, nothing to keep
            task_types.forget_validated(tasks, embedder)

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
                log({"step": step, "epoch": epoch, "task": task_name, "loss": loss, "acc": acc, "lr": lr_now,
                     "tokens_per_s": tokens / seconds, "skipped": not finite})
            bar.update(task, completed=step, loss=loss, acc=acc, lr=lr_now, tps=tokens / seconds)
            pending.clear()

        chunked = False  # a micro-batch of this process went through GradCache: the rest follow (config.py)
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
                chunk = grad_cache_chunk(cfg.grad_cache, device.type, inputs, chunked_before=chunked,
                                         fp32=amp_dtype is None)
                chunked = chunked or chunk > 0
                loss, stats = forward_backward(embed, inputs, loss_fn, chunk_size=chunk, loss_scale=scale,
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

            # counted from the first stage's end, so that validation falls on the labelled epochs' ends
            since_stage = step - sampler.stage_steps
            evaluate = since_stage % eval_every == 0 or step == total_steps
            save = since_stage % save_every == 0 or step == total_steps
            if step % log_every == 0 or evaluate or save:
                read_back()
            if evaluate:
                stop = trainer["stopped"] = evaluate_and_keep_best(step)
                if stop:
                    console.print(f"early stop: no improvement in {cfg.patience} validations")
            if (cfg.remine and not stop and sampler.stage_steps < step < total_steps
                    and sampler.batch(trainer["micro_step"])[0] != epoch):  # a labelled epoch's end
                # the next epoch's negatives, mined by this model with the corpus embeddings its validation made
                with clock("mining"):
                    ids = retrieval.remine(embedder, cpu_bf16) if info.main else None
                trainer["negatives"] = distributed.broadcast(ids, info)
                if not info.main:
                    retrieval.use_negatives(trainer["negatives"])
                batches.restart(trainer["micro_step"])  # the micro-batches built ahead hold the old negatives
                console.print(f"step {step}: negatives mined again with this model (--remine)")
            if evaluate and info.main and has_val and trainer["best_step"] != step:
                task_types.forget_validated(tasks, embedder)  # not best/: no test will need its corpus embeddings
            if save or stop:
                if teacher is not None:  # the rows computed up to this state: a resumed run reads them, not recomputes
                    teacher.flush()
                rng = distributed.rng_states(info)  # every rank's dropout RNG, for an exact resume
                if info.main:
                    with clock("checkpoint"):
                        save_state(run_dir, step, trained, optimizer, trainer, rng=rng, scaler=scaler)
                distributed.barrier(info)

    # ---- the ending: base vs fine-tuned (and a mix of them) on the held-out test set, results.json ---------------
    log.close()
    if not info.main:  # rank 0 exports and evaluates; the others are done
        distributed.shutdown(info)
        return TrainResult({}, run_dir)
    clock.enter("test")  # the test set (and the merge sweep's validation and the exports, timed apart)
    with clock("export"):
        export(embedder, tasks, run_dir / "final")
        if trainer["best"] is None:  # nothing to choose by: the last weights are the best we know
            export(embedder, tasks, run_dir / "best")
    results = ending.finish(cfg, tasks, run_dir, trainer, device=device, cpu_bf16=cpu_bf16, probe=probe, clock=clock,
                            score=validation_scores)
    distributed.shutdown(info)
    return TrainResult(results, run_dir)
