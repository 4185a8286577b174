"""Fine-tune a BGE embedding model contrastively on a domain file, then show how retrieval on held-out
queries changed.

    python train.py --data examples/bike_repair.jsonl
    python train.py --data ../shared/data/scifact --split train --model BAAI/bge-small-en-v1.5
    python train.py --resume checkpoints/<run>

Read top to bottom: set-up, data, model, the loop (step, validate, save), the ending (base vs fine-tuned on
the held-out test queries). Every knob is a field of bge.config.TrainConfig and a --flag.
"""
from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from rich.progress import TextColumn
from rich.table import Table

from bge.batching import Sampler, make_batch, split_queries
from bge.checkpoint import atomic_write_text, latest_state, load_state, save_state
from bge.config import TrainConfig, config_from_dict, parse_args
from bge.console import console, progress, run_cli
from bge.data import RetrievalData, examples_from_beir, load_beir, load_corpus, load_examples, retrieval_from_examples
from bge.embedder import Embedder, default_device
from bge.errors import UserError
from bge.evaluation import evaluate_probe, evaluate_retrieval, load_eval_data
from bge.loss import distill_kl, false_negative_mask, info_nce, matryoshka
from bge.merge import choose_ratio, merged_embedder, parse_ratios
from bge.optim import default_lr, get_lr, make_optimizer
from bge.step import forward_backward

REPO = Path(__file__).resolve().parent
VAL_KS = (1, 10, 100)
TEST_KS = (1, 3, 5, 10, 100)
TABLE_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100")
RESUMABLE_OVERRIDES = {"epochs", "max_steps", "patience", "eval_every", "save_every", "device", "compile",
                       "eval_batch_size", "resume"}  # what may change when a run continues


# ---- set-up helpers ----------------------------------------------------------------------------------
def load_data(cfg: TrainConfig, run_dir: Path) -> tuple[list, RetrievalData | None, RetrievalData | None, dict]:
    """Training examples, validation and test sets. Without --val/--test files, queries are carved out of
    --data by seed (a query's positives never cross splits) and the split is written to the run folder."""
    path = Path(cfg.data)
    if path.is_dir():
        if cfg.corpus:
            raise UserError("--corpus is for a JSONL --data; a BEIR folder brings its own corpus")
        full = load_beir(path, cfg.split, use_title=cfg.title)
        examples = examples_from_beir(full)
    else:
        examples, skipped = load_examples(path, skip_bad_lines=cfg.skip_bad_lines)
        if skipped:
            console.print(f"[yellow]skipped {len(skipped)} bad line(s) of {path}[/] (--skip-bad-lines); first: {skipped[0]}")
        corpus = load_corpus(cfg.corpus, use_title=cfg.title) if cfg.corpus else None
        full = retrieval_from_examples(examples, name=path.name, corpus=corpus)
    split_file = run_dir / "split.json"
    if split_file.exists():  # resuming: the split is part of the run
        split = json.loads(split_file.read_text())
    else:
        val_ratio = 0.0 if cfg.val else cfg.val_ratio
        test_ratio = 0.0 if cfg.test else cfg.test_ratio
        parts = split_queries(examples, val_ratio, test_ratio, cfg.seed)
        split = {"seed": cfg.seed, "val_ratio": val_ratio, "test_ratio": test_ratio,
                 **{name: [examples[i].qid for i in idx] for name, idx in parts.items()}}
        atomic_write_text(split_file, json.dumps(split) + "\n")
    train_ids = set(split["train"])
    train = [ex for ex in examples if ex.qid in train_ids]
    val = load_eval_data(cfg.val, "dev", cfg.title) if cfg.val else full.subset(split["val"])
    test = load_eval_data(cfg.test, "test", cfg.title) if cfg.test else full.subset(split["test"])
    for name, d in (("--val", val), ("--test", test)):
        if not isinstance(d, RetrievalData):
            raise UserError(f"{name} must be a retrieval set (BEIR folder or training JSONL), not STS pairs")
    if not train:
        raise UserError(f"{cfg.data}: no training queries left after holding out validation and test queries")
    return train, (val if val.queries else None), (test if test.queries else None), split


def precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """(autocast dtype or None for fp32, GradScaler for fp16 only)."""
    choice = cfg.precision
    if choice == "auto":
        choice = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; use bf16 or fp32 on CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return dtype, (torch.amp.GradScaler("cuda") if choice == "fp16" else None)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def validate(embedder: Embedder, data: RetrievalData, cfg: TrainConfig, cpu_bf16: bool) -> dict[str, float]:
    ev = evaluate_retrieval(embedder, data, ks=VAL_KS, batch_size=cfg.eval_batch_size,
                            max_length=cfg.max_passage_length, cpu_bf16=cpu_bf16, show_progress=False)
    return ev.metrics.summary


def results_table(title: str, base: dict, tuned: dict, merged: dict | None = None, ratio: float | None = None) -> Table:
    """Metrics as rows (test, then the probe's), base and fine-tuned (and merged) as columns, with changes."""
    table = Table(title=title)
    columns = ["metric", "base", "fine-tuned", "change"] + ([f"merged {ratio:g}", "change"] if merged else [])
    for col in columns:
        table.add_column(col, justify="left" if col == "metric" else "right")

    def change(d: float) -> str:
        style = "green" if d > 0 else "red" if d < 0 else ""
        return f"[{style}]{d:+.4f}[/]" if style else f"{d:+.4f}"

    for m in [*TABLE_METRICS, *(k for k in base if k.startswith("probe/"))]:
        cells = [f"{base[m]:.4f}", f"{tuned[m]:.4f}", change(tuned[m] - base[m])]
        if merged:
            cells += [f"{merged[m]:.4f}", change(merged[m] - base[m])]
        table.add_row(m, *cells)
    return table


# ---- the run -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    cfg, explicit = parse_args(argv)
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume {run_dir}: not a run folder (no config.json)")
        changed = explicit - RESUMABLE_OVERRIDES
        if changed:
            raise UserError(f"--resume continues the saved config; cannot change {', '.join(sorted(changed))}")
        saved = json.loads((run_dir / "config.json").read_text())
        cfg = config_from_dict({**saved, **{k: getattr(cfg, k) for k in explicit}}, str(run_dir / "config.json"))
    else:
        if not cfg.data:
            raise UserError("--data is required (a FlagEmbedding-format JSONL or a BEIR folder)")
        if not Path(cfg.data).exists():
            raise UserError(f"--data {cfg.data}: no such file or folder")
        name = cfg.run_name or f"{Path(cfg.data).stem}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = Path(cfg.out_dir) / name
        if (run_dir / "state").exists():
            raise UserError(f"{run_dir} already holds a run; pass --resume {run_dir} or another --run-name")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        atomic_write_text(run_dir / "command.txt", shlex.join([sys.executable, *sys.argv]) + "\n")
        atomic_write_text(run_dir / "git.txt", git_commit() + "\n")
    device = default_device() if cfg.device == "auto" else torch.device(cfg.device)
    torch.manual_seed(cfg.seed)

    # data
    train_examples, val_data, test_data, split = load_data(cfg, run_dir)
    console.print(f"run {run_dir}: {len(train_examples)} training queries, "
                  f"{len(val_data.queries) if val_data else 0} validation, {len(test_data.queries) if test_data else 0} test")
    probe = load_eval_data(cfg.general_probe, cfg.probe_split, cfg.title) if cfg.general_probe else None
    merge_ratios = parse_ratios(cfg.merge_sweep) if cfg.merge_sweep else []
    if merge_ratios and val_data is None:
        raise UserError("--merge-sweep chooses a mix on the validation queries; there are none (--val-ratio 0?)")
    if merge_ratios and cfg.merge_ratio >= 0:
        raise UserError("pass --merge-sweep (choose a mix on validation) or --merge-ratio (a fixed mix), not both")
    if cfg.merge_ratio > 1:
        raise UserError(f"--merge-ratio must be in [0, 1] (or negative: no merge), got {cfg.merge_ratio}")
    if cfg.kd_weight > 0 and not all(ex.neg and ex.pos_scores and ex.neg_scores for ex in train_examples):
        raise UserError("--kd-weight needs hard negatives with teacher scores (pos_scores, neg_scores) on every "
                        "training line; python -m bge.score --teacher MODEL fills them")
    if cfg.kd_weight > 0 and cfg.group_size < 2:
        raise UserError("--kd-weight distils over each query's positive and hard negatives: needs --group-size 2 or more")
    matryoshka_dims = [int(d) for d in cfg.matryoshka_dims.split(",") if d.strip()] if cfg.matryoshka_dims else []

    # model
    embedder = Embedder.load(cfg.model, device=device, query_prompt=None if cfg.query_prompt == "auto" else cfg.query_prompt)
    model, tokenizer = embedder.model, embedder.tokenizer
    if not all(0 < d <= model.dim for d in matryoshka_dims):
        raise UserError(f"--matryoshka-dims {cfg.matryoshka_dims}: sizes must be between 1 and {model.dim}")
    amp_dtype, scaler = precision(cfg, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    model_embed = torch.compile(model.embed) if cfg.compile else model.embed  # the raw module is what we save

    def embed(ids: list[list[int]]) -> torch.Tensor:
        """Token id lists -> float32 embeddings, padded per call (per GradCache chunk)."""
        input_ids, mask = tokenizer.pad(ids)
        with autocast:
            return model_embed(input_ids.to(device), mask.to(device)).float()
    cpu_bf16 = device.type == "cpu" and amp_dtype == torch.bfloat16  # evaluate in the arithmetic we train in

    # optimisation
    lr = cfg.lr or default_lr(model.cfg.hidden_size)
    sampler = Sampler(train_examples, cfg.batch_size, cfg.seed)
    steps_per_epoch = max(1, len(sampler) // cfg.grad_accum)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    eval_every = cfg.eval_every or steps_per_epoch
    save_every = cfg.save_every or eval_every
    optimizer = make_optimizer(model, lr=lr, weight_decay=cfg.weight_decay)
    group_size = cfg.group_size if any(ex.neg for ex in train_examples) else 1
    if group_size != cfg.group_size:
        console.print("no hard negatives in the data: training with in-batch negatives only")

    # state: fresh, or restored from the last complete save
    trainer = {"step": 0, "micro_step": 0, "best": None, "best_step": None, "stale_evals": 0, "bad_steps": 0,
               "bad_steps_total": 0, "train_seconds": 0.0, "tokens": 0, "base_val": None, "best_val": None}
    state = latest_state(run_dir) if cfg.resume else None
    if state is not None:
        trainer.update(load_state(state, model, optimizer))
        console.print(f"resumed from {state} at step {trainer['step']}")
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.exists():  # forget what was logged after the state we resume from
        kept = [l for l in metrics_path.read_text().splitlines() if json.loads(l)["step"] <= trainer["step"]]
        atomic_write_text(metrics_path, "".join(l + "\n" for l in kept))
    log = open(metrics_path, "a", encoding="utf-8")

    def log_line(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()

    def validation_scores(model_: Embedder) -> dict[str, float]:
        """val/<metric> on the domain validation queries and probe/<metric> on the general probe."""
        scores = {f"val/{k}": v for k, v in validate(model_, val_data, cfg, cpu_bf16).items()}
        return scores | probe_scores(model_)

    def probe_scores(model_: Embedder) -> dict[str, float]:
        if probe is None:
            return {}
        scores = evaluate_probe(model_, probe, batch_size=cfg.eval_batch_size, max_length=cfg.max_passage_length,
                                cpu_bf16=cpu_bf16)
        return {f"probe/{k}": v for k, v in scores.items()}

    def evaluate_and_keep_best(step: int) -> bool:
        """Validate; export best/ when nDCG@10 improves; True when patience has run out."""
        if val_data is None:
            return False
        scores = validation_scores(embedder)
        log_line({"step": step, **scores})
        score = scores["val/ndcg@10"]
        if step == 0:
            trainer["base_val"] = scores
        if trainer["best"] is None or score > trainer["best"]:
            trainer.update(best=score, best_step=step, stale_evals=0, best_val=scores)
            embedder.save(run_dir / "best")
        else:
            trainer["stale_evals"] += 1
        probe_note = next((f" · {k} {v:.4f}" for k, v in scores.items() if k.startswith("probe/")), "")  # headline
        console.print(f"step {step}: val nDCG@10 {score:.4f} (best {trainer['best']:.4f} at step {trainer['best_step']})"
                      + probe_note)
        return cfg.patience > 0 and trainer["stale_evals"] >= cfg.patience

    if trainer["step"] == 0 and trainer["best"] is None:
        evaluate_and_keep_best(0)  # the base model is the first candidate for best/

    # ---- the loop ----------------------------------------------------------------------------------
    model.train()
    stats = TextColumn("loss {task.fields[loss]:.4f} · acc {task.fields[acc]:.2f} · lr {task.fields[lr]:.2e} · "
                       "{task.fields[tps]:,.0f} tok/s")
    stop = False
    with progress(stats) as bar:
        task = bar.add_task("training", total=total_steps, completed=trainer["step"], loss=0.0, acc=0.0, lr=0.0, tps=0.0)
        while trainer["step"] < total_steps and not stop:
            t0 = time.perf_counter()
            step_loss, step_acc, tokens, finite = 0.0, 0.0, 0, True
            for _ in range(cfg.grad_accum):
                epoch, indices = sampler.batch(trainer["micro_step"])
                batch = make_batch(train_examples, indices, group_size=group_size, seed=cfg.seed, epoch=epoch)
                inputs = {"q": tokenizer.tokenize(batch.query_texts(tokenizer.query_prompt), max_length=cfg.max_query_length),
                          "p": tokenizer.tokenize(batch.passages, max_length=cfg.max_passage_length)}
                tokens += sum(len(x) for ids in inputs.values() for x in ids)
                mask = false_negative_mask(batch.passage_hashes, batch.query_pos_hashes, batch.pos_index).to(device)

                def loss_fn(emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
                    loss, acc = info_nce(emb["q"], emb["p"], batch.pos_index.to(device), cfg.temperature, mask=mask,
                                         owner=batch.owner.to(device), in_batch=cfg.in_batch_negatives,
                                         symmetric=cfg.symmetric)
                    if cfg.kd_weight > 0:  # towards the teacher's distribution over each query's own group
                        loss = loss + cfg.kd_weight * distill_kl(emb["q"], emb["p"], batch.owner.to(device),
                                                                 batch.teacher_scores.to(device), cfg.temperature,
                                                                 cfg.kd_temperature)
                    return loss, {"acc": acc}

                def full_loss(emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
                    return matryoshka(loss_fn, emb, matryoshka_dims)

                scale = (scaler.get_scale() if scaler else 1.0) / cfg.grad_accum
                loss, stats = forward_backward(embed, inputs, full_loss, chunk_size=cfg.grad_cache, loss_scale=scale,
                                               device=device)
                finite &= bool(torch.isfinite(loss))
                step_loss += loss.item() / cfg.grad_accum
                step_acc += stats["acc"].item() / cfg.grad_accum
                trainer["micro_step"] += 1

            lr_now = get_lr(trainer["step"], lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, schedule=cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            if finite:
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.clip_grad > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                trainer["bad_steps"] = 0
            else:  # skip the update, count it, and give up when it keeps happening
                trainer["bad_steps"] += 1
                trainer["bad_steps_total"] += 1
                if trainer["bad_steps"] >= cfg.max_bad_steps:
                    raise UserError(f"the loss was NaN/inf for {cfg.max_bad_steps} steps in a row (step {trainer['step']}); "
                                    f"try a lower --lr, --precision fp32, or check the data")
            optimizer.zero_grad(set_to_none=True)
            trainer["step"] += 1
            step = trainer["step"]

            seconds = time.perf_counter() - t0
            trainer["train_seconds"] += seconds
            trainer["tokens"] += tokens
            log_line({"step": step, "epoch": epoch, "loss": step_loss, "acc": step_acc, "lr": lr_now,
                      "tokens_per_s": tokens / seconds, "skipped": not finite})
            bar.update(task, completed=step, loss=step_loss, acc=step_acc, lr=lr_now, tps=tokens / seconds)

            if step % eval_every == 0 or step == total_steps:
                stop = evaluate_and_keep_best(step)
                if stop:
                    console.print(f"early stop: no improvement in {cfg.patience} validations")
            if step % save_every == 0 or step == total_steps or stop:
                save_state(run_dir, step, model, optimizer, trainer)
    log.close()
    embedder.save(run_dir / "final")
    if val_data is None:  # nothing to choose by: the last weights are the best we know
        embedder.save(run_dir / "best")

    # ---- the forgetting guard: base and fine-tuned weights mixed (LM-Cocktail), chosen on validation -----
    results = {"run": str(run_dir), "config": cfg.to_dict(), "best_step": trainer["best_step"], "best_val_ndcg@10": trainer["best"],
               "steps": trainer["step"], "train_seconds": trainer["train_seconds"], "skipped_steps": trainer["bad_steps_total"],
               "train_queries": len(train_examples)}
    base = Embedder.load(cfg.model, device=device, query_prompt=tokenizer.query_prompt)
    tuned = Embedder.load(str(run_dir / "best"), device=device)
    models = {"base": base, "fine_tuned": tuned}
    ratio = cfg.merge_ratio if cfg.merge_ratio >= 0 else None
    if merge_ratios:
        # both ends were validated during training (a state saved by an older version lacks them)
        sweep = {0.0: trainer["base_val"] or validation_scores(base), 1.0: trainer["best_val"] or validation_scores(tuned)}
        for r in merge_ratios:
            if r not in sweep:
                sweep[r] = validation_scores(merged_embedder(base, tuned, r))
                shown = [f"{k} {v:.4f}" for k, v in sweep[r].items() if k in ("val/ndcg@10", "probe/spearman", "probe/ndcg@10")]
                console.print(f"merged at {r:g}: " + " · ".join(shown))
        headline = next((k for k in sweep[0.0] if k.startswith("probe/")), None)
        ratio = choose_ratio({r: s["val/ndcg@10"] for r, s in sweep.items()},
                             {r: s[headline] for r, s in sweep.items()} if headline else None, cfg.probe_tolerance)
        console.print(f"merge sweep: chose ratio {ratio:g} (best val nDCG@10 with {headline or 'no probe'} at most "
                      f"{cfg.probe_tolerance} below the base model's)")
        results["merge_sweep"] = {f"{r:g}": s for r, s in sorted(sweep.items())}
    if ratio is not None:
        models["merged"] = merged_embedder(base, tuned, ratio)
        models["merged"].save(run_dir / "merged")
        results["merge_ratio"] = ratio

    # ---- the ending: base vs fine-tuned (and merged) on the held-out test queries and the probe ---------
    if test_data is not None:
        kw = dict(ks=TEST_KS, batch_size=cfg.eval_batch_size, max_length=cfg.max_passage_length,
                  cpu_bf16=cpu_bf16, cache_dir=Path(cfg.out_dir) / "cache")
        evals = {name: evaluate_retrieval(m, test_data, **kw).metrics for name, m in models.items()}
        scores = {name: e.summary | probe_scores(models[name]) for name, e in evals.items()}
        b, t, m = scores["base"], scores["fine_tuned"], scores.get("merged")
        console.print(results_table(f"held-out test: {len(test_data.queries)} queries, {len(test_data.corpus)} passages",
                                    b, t, m, ratio))
        results.update(test_queries=evals["base"].n_scored, test_corpus=len(test_data.corpus),
                       test_fingerprint=test_data.fingerprint(), base=b, fine_tuned=t, change={k: t[k] - b[k] for k in b})
        if m is not None:
            results.update(merged=m, merged_change={k: m[k] - b[k] for k in b})
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {run_dir / 'results.json'}; fine-tuned model in {run_dir / 'best'}")


if __name__ == "__main__":
    run_cli(main)
