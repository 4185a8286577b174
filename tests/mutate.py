"""The mutation check: does the test suite notice when a core line breaks?

Each entry of MUTATIONS is a one-line change to the code (file, the exact original text, its replacement) and the
few tests chosen to notice it. For each one this script copies the repository (the files git tracks or would track,
as they are in the working tree; never the working tree itself) into a temporary folder, applies the mutation there,
runs `python -m pytest -x -q` on the chosen tests and records the mutation as caught (a test failed) or missed (they
all passed). It first runs every chosen test once unmutated: a test that fails already would catch anything.

    python tests/mutate.py                       # every mutation, two at a time
    python tests/mutate.py -j 1 --only loss.symmetric-mask-not-transposed
    python tests/mutate.py --list                # the mutations and their tests, nothing run

It prints a table (caught / missed / error per mutation) and writes the same as JSON (--json, default
checkpoints/mutations.json). Exit status 1 when any mutation was missed or failed to apply. pytest does not collect
this file (its name does not start with test_), so the default test run stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str  # area.what-breaks
    file: str
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files, as few as notice the change


def m(name: str, file: str, original: str, replacement: str, *tests: str) -> Mutation:
    return Mutation(name, file, original, replacement, tests)


LOSS, POOL, OPTIM, BATCH, TASKS = "tests/test_loss.py", "tests/test_pooling.py", "tests/test_optim.py", \
    "tests/test_batching.py", "tests/test_tasks.py"
RESUME, TRAIN, DATA, METRICS = "tests/test_resume.py", "tests/test_train.py", "tests/test_data.py", "tests/test_metrics.py"
DIST = "tests/test_distributed.py::test_two_ranks_take_the_single_process_step"
STEP, PACKING = "tests/test_step.py", "tests/test_packing.py"
MINE_BM25 = "tests/test_mine.py::test_bm25_mining_takes_bm25s_ranks_and_the_models_scores"
BM25_SCORES = "tests/test_bm25.py::test_scores_equal_the_formula_and_bm25s_lucene"
REMINE = "tests/test_recipe.py::test_remine_mines_again_with_the_trained_model_trains_on_it_and_resumes_with_it"
STAGE = ("tests/test_recipe.py::test_unlabeled_stage_trains_the_pseudo_pairs_first_then_the_labelled_data_and_resumes_"
         "mid_stage")
STAGE_CHECKS = "tests/test_recipe.py::test_unlabeled_stage_needs_pseudo_pairs_and_is_the_only_stage"
VERSUS = "tests/test_recipe.py::test_quality_benchmark_pairs_a_recipe_with_another_on_the_seeds_both_ran"
EXTRA = "tests/test_recipe.py::test_extra_data_is_trained_on_and_leaves_the_split_and_the_held_out_sets_as_they_were"
EXTRA_MINED = "tests/test_recipe.py::test_extra_data_is_mined_against_its_own_passages_and_leaves_the_data_negatives_alone"
PASSAGE_TOKENIZER = "tests/test_model.py::test_passage_prompt_is_the_folders_document_prompt_and_reaches_passages_only"
PASSAGE_CACHE = "tests/test_evaluate.py::test_passage_prompt_reaches_every_passage_and_keys_the_cache"
PASSAGE_STAGE = "tests/test_distill_corpus.py::test_the_stage_gives_its_passages_the_passage_instruction"
PASSAGE_TEACHER = ("tests/test_distill_corpus.py::test_the_teacher_embeds_passages_with_its_passage_instruction_and_"
                   "preloads_them_so")
PASSAGE_RUN = "tests/test_train.py::test_passage_prompt_is_trained_and_exported_while_the_base_keeps_its_own"
PASSAGE_CARD = "tests/test_card.py::test_usage_snippets_embed_as_bge_does"

MUTATIONS = [
    # ---- loss ------------------------------------------------------------------------------------------
    m("loss.symmetric-mask-not-transposed", "bge/loss.py", "back_drop = drop[:, pos_index].T if mask",
      "back_drop = drop[:, pos_index] if mask", LOSS),
    m("loss.in-batch-off-ignores-query-offset", "bge/loss.py",
      "drop |= owner[None, :] != (rows + query_offset)[:, None]", "drop |= owner[None, :] != rows[:, None]", LOSS),
    m("loss.temperature-multiplies", "bge/loss.py", "scores = q @ p.T / temperature  # (B, P)",
      "scores = q @ p.T * temperature  # (B, P)", LOSS),
    m("loss.false-negative-mask-needs-every-positive", "bge/loss.py",
      "same = (passage_hashes[None, :, None] == query_pos_hashes[:, None, :]).any(-1)",
      "same = (passage_hashes[None, :, None] == query_pos_hashes[:, None, :]).all(-1)", LOSS),
    m("loss.cosent-order-reversed", "bge/loss.py", "diff = scale * (cos[None, :] - cos[:, None])",
      "diff = scale * (cos[:, None] - cos[None, :])", LOSS),
    m("loss.cosine-mse-is-l1", "bge/loss.py", "return F.mse_loss(cos, target.to(cos.dtype))",
      "return F.l1_loss(cos, target.to(cos.dtype))", LOSS),
    m("loss.similarity-kl-reversed", "bge/loss.py", "log_t.exp() * (log_t - log_s), torch.zeros_like(log_t))",
      "log_s.exp() * (log_s - log_t), torch.zeros_like(log_t))", LOSS),
    m("loss.teacher-scores-at-student-temperature", "bge/loss.py",
      "teacher = (teacher_scores[None, :].float() / teacher_temperature)",
      "teacher = (teacher_scores[None, :].float() / temperature)", LOSS),
    m("loss.matryoshka-not-renormalised", "bge/loss.py", "loss_fn({k: truncate(e, d) for k, e in emb.items()})",
      "loss_fn({k: e[:, :d] for k, e in emb.items()})", LOSS),
    m("loss.label-mask-inverted", "bge/loss.py", "same = anchor_labels[:, None] == passage_labels[None, :]",
      "same = anchor_labels[:, None] != passage_labels[None, :]", LOSS),
    m("loss.head-labels-shifted", "bge/loss.py", "return F.cross_entropy(logits, labels), ",
      "return F.cross_entropy(logits, labels.flip(0)), ", LOSS),
    m("loss.l1-signed", "bge/loss.py", "return torch.stack([p.abs().sum() for p in params]).sum()",
      "return torch.stack([p.sum() for p in params]).sum()", LOSS),
    m("loss.embedding-distill-summed", "bge/loss.py", "return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()",
      "return (1 - F.cosine_similarity(student, teacher, dim=-1)).sum()", LOSS),
    # ---- model and pooling ----------------------------------------------------------------------------------------
    m("pool.packed-cls-takes-the-last-token", "bge/model.py", "        return states[starts]\n",
      "        return states[starts + lengths - 1]\n", POOL),
    m("pool.padded-cls-takes-the-second-token", "bge/model.py", "return states[:, 0]", "return states[:, 1]", POOL),
    m("pool.mean-over-padding", "bge/model.py", "return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)",
      "return states.mean(1)", POOL),
    m("model.padding-attended", "bge/model.py", "key_mask = attention_mask.bool()[:, None, None, :]",
      "key_mask = torch.ones_like(attention_mask, dtype=torch.bool)[:, None, None, :]", POOL),
    m("model.not-normalised", "bge/model.py", "return F.normalize(pooled, dim=-1) if self.cfg.normalize else pooled",
      "return pooled", POOL),
    # ---- the unpadded (varlen) layout ------------------------------------------------------------------------------
    m("packing.flash-despite-dropout", "bge/packing.py", "and cuda and p == 0 and dtype", "and cuda and dtype", PACKING),
    m("packing.flash-in-fp32", "bge/packing.py", "and dtype in (torch.float16, torch.bfloat16)", "", PACKING),
    m("packing.positions-run-on-across-texts", "bge/packing.py",
      "positions = torch.arange(len(flat)) - cu[:-1].long()[sequence]", "positions = torch.arange(len(flat))", PACKING),
    m("model.varlen-never-takes-flash", "bge/model.py", "if packing.flash_applies(qkv.dtype, p, qkv.is_cuda):",
      "if False:", PACKING),
    m("model.varlen-view-misplaces-tokens", "bge/model.py", "where = batch.sequence * W + batch.positions",
      "where = batch.sequence * W + batch.positions.flip(0)", PACKING),
    m("weights.random-init-before-loading", "bge/weights.py", 'with torch.device("meta"):', 'with torch.device("cpu"):',
      "tests/test_model.py::test_loading_draws_no_random_weights_first"),
    m("diagnostics.changes-not-json-shaped", "bge/diagnostics.py", '"top_before": [list(t) for t in c.top_before],',
      '"top_before": c.top_before,', "tests/test_diagnostics.py::test_compare_is_json_ready_and_renders"),
    m("ending.returns-results-as-built", "bge/ending.py", "    results = json.loads(text)\n", "",
      "tests/test_train.py::test_returned_results_are_what_results_json_says"),
    m("ending.base-tested-with-the-runs-instruction", "bge/ending.py", "    base = Embedder.load(cfg.model, device=device)\n",
      "    base = Embedder.load(cfg.model, device=device, query_prompt=tuned.tokenizer.query_prompt)\n",
      "tests/test_train.py::test_the_base_is_tested_with_its_own_query_instruction_not_the_runs"),
    m("training.best-at-step-0-takes-the-runs-instruction", "bge/training.py",
      "            tokenizer.query_prompt, tokenizer.passage_prompt = base_prompts\n", "            pass\n",
      "tests/test_train.py::test_best_at_step_0_is_the_base_with_its_own_instruction"),
    m("training.step-0-validated-with-the-bases-instruction", "bge/training.py",
      "        evaluate_and_keep_best(0)  # the base model",
      "        tokenizer.query_prompt, run_prompt = base_query_prompt, tokenizer.query_prompt\n"
      "        evaluate_and_keep_best(0)\n        tokenizer.query_prompt = run_prompt  # the base model",
      "tests/test_train.py::test_best_at_step_0_is_the_base_with_its_own_instruction"),
    m("training.best-scores-at-step-0-are-the-runs", "bge/training.py",
      'best_val=trainer["base_val"] if step == 0 else scores', "best_val=scores",
      "tests/test_train.py::test_best_at_step_0_is_the_base_with_its_own_instruction"),
    m("training.base-scores-kept-under-another-instruction", "bge/training.py",
      'trainer["base_val"] = scores if (tokenizer.query_prompt, tokenizer.passage_prompt) == base_prompts else None',
      'trainer["base_val"] = scores',
      "tests/test_train.py::test_the_base_is_tested_with_its_own_query_instruction_not_the_runs"),
    m("prepare.auto-prompt-never-new", "bge/prepare.py", "tokenizer.query_prompt = NEW_QUERY_PROMPT", "pass",
      "tests/test_train.py::test_auto_query_prompt_is_the_models_own_or_e5s_prefix"),
    m("prepare.auto-prompt-for-sts-too", "bge/prepare.py", "elif retrieval and cfg.arch == \"bert\" and not tokenizer.prompt_stated:",
      "elif not tokenizer.prompt_stated:", "tests/test_train.py::test_auto_query_prompt_is_the_models_own_or_e5s_prefix"),
    m("prepare.auto-prompt-for-a-new-bilstm-too", "bge/prepare.py",
      "elif retrieval and cfg.arch == \"bert\" and not tokenizer.prompt_stated:",
      "elif retrieval and not tokenizer.prompt_stated:", "tests/test_train.py::test_auto_query_prompt_is_the_models_own_or_e5s_prefix"),
    m("tokenizer.empty-prompt-unstated", "bge/tokenizer.py", "tokenizer.prompt_stated = stated is not None",
      "tokenizer.prompt_stated = bool(stated)", "tests/test_train.py::test_auto_query_prompt_is_the_models_own_or_e5s_prefix"),
    m("console.logs-at-80-columns", "bge/console.py", "width=None if tty else LOG_WIDTH",
      "width=None", "tests/test_package.py::test_a_log_file_or_a_pipe_gets_whole_lines_not_80_columns"),
    # ---- optimiser and schedule ---------------------------------------------------------------------------------
    m("optim.linear-decay-ignores-min-lr-ratio", "bge/optim.py",
      "return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * decay)", "return lr * decay", OPTIM),
    m("optim.warmup-off-by-one", "bge/optim.py", "return lr * (step + 1) / warmup_steps",
      "return lr * step / warmup_steps", OPTIM),
    m("optim.cosine-full-swing", "bge/optim.py", "decay = 0.5 * (1.0 + math.cos(math.pi * progress))",
      "decay = math.cos(math.pi * progress)", OPTIM),
    m("optim.decay-on-biases-and-layernorms", "bge/optim.py", "if p.requires_grad and p.ndim >= 2]",
      "if p.requires_grad and p.ndim >= 1]", OPTIM),
    m("optim.default-lr-boundary", "bge/optim.py", "if hidden_size <= limit)", "if hidden_size < limit)", OPTIM),
    m("optim.freezes-one-layer-too-many", "bge/optim.py", "*model.layers[:layers].parameters()]",
      "*model.layers[: layers + 1].parameters()]", "tests/test_freeze_checkpoint.py::test_frozen_weights_do_not_change_after_a_step"),
    m("optim.layer-decay-upside-down", "bge/optim.py", "lr_scale * layer_decay ** (top - d)",
      "lr_scale * layer_decay ** d", OPTIM),
    m("optim.layer-decay-skips-the-embeddings", "bge/optim.py",
      "depth = {id(p): 0 for p in model.emb.parameters()}", "depth = {}", OPTIM),
    m("optim.layer-decay-not-passed-on", "bge/training.py", "layer_decay=cfg.layer_lr_decay,", "",
      f"{TRAIN}::test_layer_lr_decay_moves_the_lower_layers_less"),
    m("schedule.rescaled-on-resume", "bge/rundir.py", 'return saved["total_steps"], saved["warmup_steps"]',
      "return total_steps, warmup_steps", f"{RESUME}::test_a_resume_with_fewer_steps_keeps_the_schedule_and_more_steps_are_refused"),
    # ---- split and sampler ----------------------------------------------------------------------------------------
    m("sampler.always-the-first-positive", "bge/batching.py", "j = rng.randrange(len(ex.pos))", "j = 0", BATCH),
    m("split.ignores-shared-positives", "bge/batching.py",
      "return split_by_keys([{text_hash(t) for t in ex.pos} | {~text_hash(ex.query)} for ex in examples],",
      "return split_by_keys([{~text_hash(ex.query)} for ex in examples],", BATCH),
    m("sampler.same-order-every-epoch", "bge/batching.py", 'random.Random(f"{self.seed}/epoch/{epoch}").shuffle(order)',
      'random.Random(f"{self.seed}").shuffle(order)', BATCH),
    m("sampler.same-query-twice-in-a-batch", "bge/batching.py", "if i is not None and self.query_hash[i] in seen:",
      "if i is not None and self.query_hash[i] in ():", BATCH),
    m("split.one-id-space-for-all-tasks", "bge/tasks.py", 'train_ids = set(parts["train"])',
      'train_ids = {i for p in split["tasks"].values() for i in p["train"]}',
      f"{TASKS}::test_colliding_numeric_ids_of_two_tasks_never_leak_across_the_split"),
    m("split.held-out-rows-inverted", "bge/tasks.py", "rows = [it for it in items if item_id(it) in keep]",
      "rows = [it for it in items if item_id(it) not in keep]",
      f"{TASKS}::test_colliding_numeric_ids_of_two_tasks_never_leak_across_the_split"),
    m("batch.only-1neg-repeats-its-negative", "bge/batching.py", 'if ex.kind == "only_1neg":\n        return 2',
      'if ex.kind == "only_1neg":\n        return group_size', BATCH),
    m("batch.symmetric-passages-uninstructed", "bge/batching.py", "instructed += [ex.kind in SYMMETRIC]",
      "instructed += [False]", BATCH),
    # ---- checkpoint and resume ------------------------------------------------------------------------------------
    m("ckpt.scaler-not-saved", "bge/checkpoint.py", 'meta["scaler"] = scaler.state_dict()', 'meta["scaler"] = {}',
      f"{RESUME}::test_grad_scaler_round_trips_through_the_json_state"),
    m("ckpt.rng-not-restored", "bge/checkpoint.py",
      "set_rng_state({k.removeprefix(own): v for k, v in tensors.items() if k.startswith(own)})", "pass",
      f"{RESUME}::test_rng_states_are_restored_exactly"),
    m("ckpt.optimizer-not-restored", "bge/checkpoint.py",
      'optimizer.load_state_dict(optimizer_state(opt, trainer.pop("optimizer")))', 'trainer.pop("optimizer")',
      f"{TRAIN}::test_optimizer_state_round_trips_exactly"),
    m("ckpt.keeps-one-state", "bge/checkpoint.py", "KEEP = 2", "KEEP = 1",
      f"{TRAIN}::test_crash_while_writing_state_leaves_the_previous_state_readable"),
    m("ckpt.damaged-state-not-skipped", "bge/checkpoint.py", "            continue\n        return trainer, folder",
      "            raise\n        return trainer, folder",
      f"{RESUME}::test_restore_state_skips_a_damaged_state_and_refuses_when_none_is_left"),
    m("ckpt.full-disk-leaves-the-partial-state", "bge/checkpoint.py",
      "previous state as it was\n        shutil.rmtree(tmp, ignore_errors=True)", "previous state as it was\n        pass",
      f"{RESUME}::test_a_full_disk_is_one_line_and_leaves_nothing_half_written"),
    m("ckpt.bare-nan-in-json", "bge/checkpoint.py", "if isinstance(obj, float) and not math.isfinite(obj):",
      "if isinstance(obj, float) and False:", f"{TRAIN}::test_repeated_nan_loss_stops_with_a_clear_message"),
    m("resume.early-stop-forgotten", "bge/training.py", '    stop = trainer["stopped"]  #', "    stop = False  #",
      f"{RESUME}::test_patience_stops_early_and_a_resumed_stopped_run_does_not_train_on"),
    m("resume.other-world-size-accepted", "bge/rundir.py", "if saved is not None and saved != world:",
      "if saved is not None and saved < world:", f"{RESUME}::test_a_resume_under_another_world_size_is_refused"),
    m("resume.step-0-validation-logged-twice", "bge/rundir.py", 'if step is not None and json.loads(l)["step"] <= step]',
      'if json.loads(l)["step"] <= (step or 0)]', f"{RESUME}::test_trim_metrics_keeps_the_lines_up_to_the_resumed_step"),
    m("rundir.export-not-recovered", "bge/rundir.py",
      "source = tmp if tmp.is_dir() and old.is_dir() else old if old.is_dir() else None", "source = None",
      f"{RESUME}::test_exports_killed_mid_swap_are_recovered"),
    m("rundir.lock-shared", "bge/rundir.py", "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
      "fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)", f"{RESUME}::test_one_run_per_folder"),
    m("rundir.failed-start-leaves-its-folder", "bge/rundir.py", "if failed and self.fresh and not self.started:",
      "if failed and self.fresh and self.started:", f"{RESUME}::test_a_failed_start_removes_the_folder_it_created"),
    # ---- metrics --------------------------------------------------------------------------------------------
    m("metrics.ndcg-discount-shifted", "bge/metrics.py", "discount = 1.0 / np.log2(rank + 1)",
      "discount = 1.0 / np.log2(rank + 2)", METRICS),
    m("metrics.mrr-cut-off-exclusive", "bge/metrics.py", "np.where(first <= k, 1.0 / first, 0.0)",
      "np.where(first < k, 1.0 / first, 0.0)", METRICS),
    m("metrics.map-without-precision", "bge/metrics.py", "np.where(relevant, hits / rank, 0.0)",
      "np.where(relevant, 1.0 / rank, 0.0)", METRICS),
    m("metrics.spearman-ordinal-ties", "bge/metrics.py",
      "ranks[order] = np.repeat((starts + 1 + ends) / 2, ends - starts)", "ranks[order] = np.arange(1, len(x) + 1)",
      METRICS),
    m("metrics.negative-grades-count", "bge/metrics.py", "[max(grades.get(d, 0), 0) for d in docs[:depth]]",
      "[grades.get(d, 0) for d in docs[:depth]]", METRICS),
    m("metrics.macro-f1-halved", "bge/metrics.py", "f1.append(2 * tp / denom if denom else 0.0)",
      "f1.append(tp / denom if denom else 0.0)", METRICS),
    # ---- distributed gather ---------------------------------------------------------------------------------
    m("dist.uneven-shard-weight-1", "bge/distributed.py", "q_offset, len(q) * info.world / n_all", "q_offset, 1.0",
      DIST),
    m("dist.owner-not-offset", "bge/distributed.py", "gather(batch.owner.to(q.device) + q_offset, info, grad=False)",
      "gather(batch.owner.to(q.device), info, grad=False)", DIST),
    m("dist.query-offset-is-the-rank", "bge/distributed.py", "q_offset, n_all = int(counts[: info.rank].sum()),",
      "q_offset, n_all = info.rank,", DIST),
    m("dist.gather-without-grad", "bge/distributed.py", "    if grad:\n", "    if False:\n", DIST),
    m("dist.shard-drops-a-query", "bge/distributed.py", "return indices[r * n // w : (r + 1) * n // w]",
      "return indices[r * n // w : (r + 1) * n // w - (r == 0)]", DIST),
    # ---- GradCache --------------------------------------------------------------------------------------------
    m("gradcache.dropout-not-replayed", "bge/step.py", "with _replay(states[i], device), nullcontext()",
      "with nullcontext(), nullcontext()", f"{STEP}::test_dropout_is_replayed_in_the_second_forward"),
    m("gradcache.loss-scale-dropped", "bge/step.py",
      "(loss * loss_scale).backward()  # into the cached embeddings only", "loss.backward()  # into the cached embeddings only",
      f"{STEP}::test_loss_scale_scales_the_gradients_and_not_the_loss"),
    m("gradcache.chunks-misaligned", "bge/step.py", "zip(chunks, cached.grad.split(chunk_size))",
      "zip(chunks, reversed(cached.grad.split(chunk_size)))", f"{STEP}::test_gradcache_equals_full_batch_gradients"),
    # ---- task wiring -----------------------------------------------------------------------------------------
    m("tasks.sts-gold-scores-on-the-wrong-pairs", "bge/tasks.py", "scores = torch.tensor([p.score for p in pairs])",
      "scores = torch.tensor([p.score for p in reversed(pairs)])",
      f"{TASKS}::test_sts_batch_loss_pairs_each_gold_score_with_its_own_pair"),
    m("tasks.sts-gold-scores-rotated-end-to-end", "bge/tasks.py", "scores = torch.tensor([p.score for p in pairs])",
      "scores = torch.tensor([pairs[k - 1].score for k in range(len(pairs))])",
      f"{TASKS}::test_an_sts_run_learns_what_its_gold_scores_say"),
    m("tasks.cosine-mse-gold-unscaled", "bge/tasks.py", "loss = cosine_mse(cos, (gold - self.lo) / (self.hi - self.lo))",
      "loss = cosine_mse(cos, gold)", f"{TASKS}::test_sts_batch_loss_pairs_each_gold_score_with_its_own_pair"),
    m("tasks.retrieval-without-false-negative-mask", "bge/tasks.py", "cfg.temperature, mask=mask, owner=owner.to(dev),",
      "cfg.temperature, mask=None, owner=owner.to(dev),",
      f"{LOSS}::test_retrieval_loss_of_an_assembled_batch_equals_the_naive_loop"),
    m("tasks.retrieval-ignores-symmetric", "bge/tasks.py", "symmetric=cfg.symmetric, query_offset=offset)",
      "symmetric=False, query_offset=offset)", f"{LOSS}::test_retrieval_loss_of_an_assembled_batch_equals_the_naive_loop"),
    m("tasks.validation-queries-at-passage-length", "bge/tasks.py",
      "query_max_length=self.cfg.max_query_length,\n                                cpu_bf16=cpu_bf16, show_progress=False, cache_dir",
      "\n                                cpu_bf16=cpu_bf16, show_progress=False, cache_dir",
      f"{TASKS}::test_validation_and_test_truncate_queries_at_max_query_length"),
    m("tasks.symmetric-passages-tokenised-bare", "bge/tasks.py",
      '"p": tokenizer.tokenize(batch.passage_texts(prompt, tokenizer.passage_prompt),',
      '"p": tokenizer.tokenize(batch.passages,', f"{TASKS}::test_retrieval_batches_follow_flagembedding_types"),
    m("tasks.classification-partner-of-any-label", "bge/tasks.py",
      "self.partners = [[j for j in by_label[r.label] if train[j].text != r.text] for r in train]",
      "self.partners = [[j for j in range(len(train)) if train[j].text != r.text] for r in train]",
      f"{TASKS}::test_classification_positives_share_the_anchor_label_and_other_labels_are_negatives"),
    m("config.range-not-checked", "bge/config.py", "bad = next((x for x in values if x not in rng), None)", "bad = None",
      "tests/test_config.py::test_a_value_outside_the_range_is_one_line_naming_flag_value_and_range"),
    m("config.val-plus-test-may-reach-1", "bge/config.py", "if val + test >= 1:", "if val + test > 1:",
      "tests/test_config.py::test_cross_field_checks"),
    # ---- data readers ----------------------------------------------------------------------------------------
    m("data.repeated-queries-not-merged", "bge/data.py", "else first.setdefault((normalise(ex.query), ex.prompt), qid)",
      "else qid", DATA),
    m("data.named-queries-merged", "bge/data.py", "holder = qid if ex.own_id else", "holder = qid if False else", DATA),
    m("data.string-pos-split-into-characters", "bge/data.py", "v = [v] if isinstance(v, str) else v",
      "v = list(v) if isinstance(v, str) else v", DATA),
    m("data.duplicate-qid-accepted", "bge/data.py", "if first_line.setdefault(ex.qid, ex.line) != ex.line:",
      "if first_line.setdefault(ex.qid, ex.line) == -1:", DATA),
    m("data.bom-kept", "bge/data.py", 'raw = raw.removeprefix(b"\\xef\\xbb\\xbf")', "raw = raw", DATA),
    m("data.nan-score-accepted", "bge/data.py", "if not math.isfinite(score):", "if math.isinf(score):", DATA),
    m("data.flagembedding-type-dropped", "bge/data.py",
      'kind = obj.get("type") if obj.get("type") in FLAGEMBEDDING_TYPES else ""', 'kind = ""', BATCH),
    m("data.corpus-title-dropped", "bge/data.py", 'corpus[_id] = (title + " " + text).strip() if use_title else text',
      "corpus[_id] = text", DATA),
    # several --data files: one file per micro-batch, *no_in_batch_neg followed, ids namespaced, the API = the CLI
    m("files.batches-mix-files", "bge/tasks.py", "return [self.train[i].file or 0 for i, _ in self.items]",
      "return [0 for i, _ in self.items]", f"{TRAIN}::test_two_files_each_batch_from_one_and_no_in_batch_neg_by_name"),
    m("files.no-in-batch-neg-ignored", "bge/tasks.py", "in_batch=cfg.in_batch_negatives and in_batch,",
      "in_batch=cfg.in_batch_negatives,", f"{TRAIN}::test_two_files_each_batch_from_one_and_no_in_batch_neg_by_name"),
    m("files.qids-not-namespaced", "bge/data.py", 'it.qid = f"{k}:{it.qid}"', "it.qid = it.qid",
      f"{TRAIN}::test_two_files_each_batch_from_one_and_no_in_batch_neg_by_name"),
    m("recipe.mining-off-by-default", "bge/config.py", 'return 7 if cfg.arch == "bert" else 0', "return 0",
      "tests/test_recipe.py::test_by_default_a_transformer_mines_7_negatives_a_new_bilstm_none_and_0_opts_out"),
    m("recipe.bilstm-mines-by-default", "bge/config.py", 'return 7 if cfg.arch == "bert" else 0', "return 7",
      "tests/test_recipe.py::test_by_default_a_transformer_mines_7_negatives_a_new_bilstm_none_and_0_opts_out"),
    m("api.config-not-checked", "bge/training.py", 'cfg = config_from_dict(cfg.to_dict(), "TrainConfig")', "pass",
      f"{TRAIN}::test_python_api_gives_the_clis_results"),
    m("memory.auto-gradcache-off", "bge/config.py",
      'return chunk if device_type == "cpu" and (padded > budget or chunked_before) else 0', "return 0",
      f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.auto-gradcache-always", "bge/config.py",
      'return chunk if device_type == "cpu" and (padded > budget or chunked_before) else 0',
      "return chunk",
      f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.explicit-gradcache-ignored", "bge/training.py",
      "chunk = grad_cache_chunk(cfg.grad_cache, device.type, inputs, chunked_before=chunked,\n"
      "                                         fp32=amp_dtype is None)", "chunk = 0",
      f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.auto-gradcache-counts-texts", "bge/config.py",
      "padded = sum(len(ids) * max(map(len, ids), default=0) for ids in inputs.values())",
      "padded = sum(sum(map(len, ids)) for ids in inputs.values())",
      f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.gradcache-not-sticky", "bge/training.py", "chunked = chunked or chunk > 0", "chunked = False",
      f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.chunked-before-ignored", "bge/config.py", "(padded > budget or chunked_before)",
      "padded > budget",
      f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.fp32-budget-as-bf16", "bge/config.py", "(AUTO_CHUNK // 2, AUTO_TOKENS_FP32) if fp32", "(AUTO_CHUNK // 2, AUTO_TOKENS) if fp32", f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.fp32-chunk-as-bf16", "bge/config.py", "(AUTO_CHUNK // 2, AUTO_TOKENS_FP32)", "(AUTO_CHUNK, AUTO_TOKENS_FP32)",
      f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.fp32-not-passed", "bge/training.py", "fp32=amp_dtype is None)", "fp32=False)", f"{TRAIN}::test_by_default_a_big_micro_batch_on_cpu_trains_through_gradcache_a_small_one_plainly"),
    m("memory.worse-validation-kept", "bge/training.py", "task_types.forget_validated(tasks, embedder)  # not best/", "pass  #",
      f"{TRAIN}::test_best_models_corpus_encoding_outlives_later_validations"),
    m("memory.malloc-not-kept", "bge/training.py", 'if device.type == "cpu" and cfg.malloc == "keep":',
      "if False:", "tests/test_malloc.py"),
    m("memory.malloc-note-dropped", "bge/training.py",
      'console.print(malloc.keep_freed_memory(), style="dim", markup=False)', "malloc.keep_freed_memory()",
      "tests/test_malloc.py::test_train_keeps_freed_memory_on_cpu_unless_told"),
    m("memory.malloc-trims", "bge/malloc.py", ", (M_TRIM_THRESHOLD, TRIM_THRESHOLD))", ",)", "tests/test_malloc.py"),
    m("memory.malloc-maps-big-blocks", "bge/malloc.py", "((M_MMAP_THRESHOLD, MMAP_THRESHOLD), ", "(",
      "tests/test_malloc.py"),
    # ---- hard-negative mining (bge/mine.py) ------------------------------------------------------------------
    m("mine.folded-line-mined-with-its-own-positives", "bge/mine.py", "data.qrels[holder.get(ex.qid, ex.qid)]",
      "(data.qrels.get(ex.qid) or {d: 1 for d, t in data.corpus.items() if t in ex.pos})",
      "tests/test_mine.py::test_a_query_on_several_lines_is_mined_with_all_its_positives"),
    m("mine.positive-text-under-another-id-kept", "bge/mine.py", 'else "positive text" if norm in pos_norm',
      'else "positive text" if False',
      "tests/test_mine.py::test_mining_never_emits_a_positive_even_duplicated_or_near_duplicated"),
    m("mine.lines-left-bare-unsaid", "bge/training.py", "and (note := retrieval.bare_note()):", "and None:",
      "tests/test_recipe.py::test_a_file_with_negatives_on_some_lines_is_not_mined_and_says_which_train_without"),
    m("mine.bm25-ranking-skipped", "bge/mine.py", 'if retriever != "model":', "if False:", MINE_BM25),
    m("mine.bm25-candidates-scored-by-bm25", "bge/mine.py", "(c_unit[picked] @ q_unit[qi]).tolist()",
      "[v for _, v in index.top(queries[qid], stop)]", MINE_BM25),
    m("mine.hybrid-is-bm25", "bge/mine.py", "top = fuse([top, [d for d, _ in ranked[qid]]])[:stop]", "pass",
      "tests/test_mine.py::test_hybrid_mining_fuses_the_bm25_and_model_rankings"),
    m("mine.fusion-takes-the-best-rank", "bge/mine.py", "score.get(d, 0.0) + 1 / (k + r)",
      "max(score.get(d, 0.0), 1 / (k + r))", "tests/test_mine.py::test_hybrid_mining_fuses_the_bm25_and_model_rankings"),
    m("mine.mine-with-not-passed", "bge/tasks.py", "retriever=cfg.mine_with, ", "",
      "tests/test_recipe.py::test_mined_negatives_are_never_positives_cached_and_share_the_base_encoding"),
    # ---- BM25 (bge/bm25.py) ---------------------------------------------------------------------------------
    m("bm25.idf-without-one", "bge/bm25.py", "idf = np.log1p(", "idf = np.log(", BM25_SCORES),
    m("bm25.no-length-normalisation", "bge/bm25.py", "(1 - b + b * lengths /", "(1 + 0 * lengths /", BM25_SCORES),
    m("bm25.query-word-counted-once", "bge/bm25.py", "out[docs] += times * weight", "out[docs] += weight",
      BM25_SCORES),
    m("bm25.unmatched-passages-ranked", "bge/bm25.py", "for i in order if s[i] > 0]", "for i in order]",
      "tests/test_bm25.py::test_top_is_best_first_ties_in_passage_order_and_never_ranks_a_passage_without_a_shared_word"),
    # ---- --extra-data: trained on, never held out -------------------------------------------------------------
    m("extra.carved-with-the-data", "bge/data.py", "(extra_items if src.extra else items).setdefault",
      "items.setdefault", EXTRA),
    m("extra.not-trained-on", "bge/tasks.py", "train += data.extra_items.get(task, [])", "train += []", EXTRA),
    m("extra.mined-against-the-data-corpus", "bge/tasks.py",
      "(self.full if k is None else self.extra_sets[k], r)", "(self.full, r)", EXTRA_MINED),
    m("extra.its-passages-made-pseudo-pairs", "bge/tasks.py",
      "[p for src in sources if src.beir and not src.extra for p", "[p for src in sources if src.beir for p", EXTRA),
    # ---- caches keyed by the model's fingerprint ---------------------------------------------------------
    m("cache.fingerprint-counts-dropout", "bge/embedder.py", 'if "dropout" not in k}', "}",
      "tests/test_evaluate.py::test_dropout_rates_leave_the_fingerprint_alone_and_the_rest_of_the_config_does_not"),
    m("cache.fingerprint-ignores-config", "bge/embedder.py", "h.update(json.dumps(cfg, sort_keys=True).encode())",
      "pass", "tests/test_evaluate.py::test_dropout_rates_leave_the_fingerprint_alone_and_the_rest_of_the_config_does_not"),
    m("cache.mining-ignores-query-prompt", "bge/tasks.py",
      "+ ([base.tokenizer.query_prompt] if base.tokenizer.query_prompt else [])", "+ []",
      "tests/test_recipe.py::test_mined_negatives_are_never_positives_cached_and_share_the_base_encoding"),
    m("cache.mining-ignores-mine-with", "bge/tasks.py", '+ ([cfg.mine_with] if cfg.mine_with != "model" else []))',
      ")", "tests/test_recipe.py::test_mined_negatives_are_never_positives_cached_and_share_the_base_encoding"),
    # ---- --passage-prompt: the passage instruction, wherever a retrieval passage is encoded -------------------
    m("passage.folder-prompt-not-read", "bge/tokenizer.py",
      'passage_prompt = next((prompts[k] for k in DOCUMENT_PROMPT_NAMES if k in prompts), "")', 'passage_prompt = ""',
      PASSAGE_TOKENIZER),
    m("passage.folder-prompt-names-out-of-order", "bge/tokenizer.py",
      'DOCUMENT_PROMPT_NAMES = ("document", "passage", "corpus")', 'DOCUMENT_PROMPT_NAMES = ("corpus", "passage", "document")',
      PASSAGE_TOKENIZER),
    m("passage.given-prompt-loses-to-the-folders", "bge/tokenizer.py",
      "        if passage_prompt is None:\n            passage_prompt = next(",
      "        if True:\n            passage_prompt = next(", PASSAGE_TOKENIZER),
    m("passage.tokenizer-never-prefixes", "bge/tokenizer.py",
      "own = self.query_prompt if is_query else self.passage_prompt", 'own = self.query_prompt if is_query else ""',
      PASSAGE_TOKENIZER),
    m("passage.encode-drops-is-passage", "bge/embedder.py", "is_passage=is_passage, prompt=prompt)", "prompt=prompt)",
      PASSAGE_TOKENIZER),
    m("passage.corpus-encoded-bare", "bge/evaluation.py", "max_length=length, is_passage=True, as_numpy=False",
      "max_length=length, as_numpy=False", PASSAGE_CACHE),
    m("passage.corpus-cache-ignores-the-prompt", "bge/evaluation.py", 'parts["passage_prompt"] = passage_prompt', "pass",
      PASSAGE_CACHE),
    m("passage.corpus-cache-keys-change-without-a-prompt", "bge/evaluation.py", "if passage_prompt:  # only when",
      "if True:  # only when", PASSAGE_CACHE),
    m("passage.mining-cache-ignores-the-prompt", "bge/tasks.py",
      '+ ([{"passage_prompt": base.tokenizer.passage_prompt}] if base.tokenizer.passage_prompt else [])', "+ []",
      "tests/test_recipe.py::test_mined_negatives_are_never_positives_cached_and_share_the_base_encoding"),
    m("passage.batch-passages-bare", "bge/batching.py", "return [passage_prompt + t for t in self.passages]",
      "return self.passages", f"{BATCH}::test_flagembedding_types_size_the_group_and_instruct_symmetric_passages"),
    m("passage.batch-passages-bare-beside-symmetric-lines", "bge/batching.py", "q[o] + t if sym else passage_prompt + t",
      "q[o] + t if sym else t", f"{BATCH}::test_flagembedding_types_size_the_group_and_instruct_symmetric_passages"),
    m("passage.trained-without-the-prompt", "bge/tasks.py", "batch.passage_texts(prompt, tokenizer.passage_prompt)",
      'batch.passage_texts(prompt, "")', f"{TASKS}::test_retrieval_batches_follow_flagembedding_types"),
    m("passage.corpus-stage-trains-passages-bare", "bge/tasks.py",
      '"p": tokenizer.tokenize(batch.passages, max_length=cfg.max_passage_length, is_passage=True)}',
      '"p": tokenizer.tokenize(batch.passages, max_length=cfg.max_passage_length)}', PASSAGE_STAGE),
    m("passage.corpus-stage-validates-passages-bare", "bge/tasks.py",
      "max_length=cfg.max_passage_length, is_passage=True, **kw)}", "max_length=cfg.max_passage_length, **kw)}",
      PASSAGE_STAGE),
    m("passage.teacher-embeds-passages-bare", "bge/distill.py",
      "passages = batch.passage_texts(tok.query_prompt, tok.passage_prompt)", 'passages = batch.passage_texts(tok.query_prompt, "")',
      PASSAGE_TEACHER),
    m("passage.teacher-preload-keyed-bare", "bge/distill.py", 'text_key("p", prompt + text)', 'text_key("p", text)',
      PASSAGE_TEACHER),
    m("passage.flag-ignored", "bge/prepare.py", "        tokenizer.passage_prompt = cfg.passage_prompt\n", "        pass\n",
      "tests/test_train.py::test_auto_passage_prompt_is_the_models_own"),
    m("passage.best-at-step-0-takes-the-runs-passage-prompt", "bge/training.py",
      "            tokenizer.query_prompt, tokenizer.passage_prompt = base_prompts\n",
      "            tokenizer.query_prompt = base_prompts[0]\n",
      "tests/test_train.py::test_best_at_step_0_is_the_base_with_its_own_instruction"),
    m("passage.base-prompt-not-reported", "bge/ending.py", 'for side in ("query", "passage"):', 'for side in ("query",):',
      PASSAGE_RUN),
    m("passage.exported-document-prompt-empty", "bge/weights.py", '"document": passage_prompt}', '"document": ""}',
      PASSAGE_RUN, "tests/test_model.py::test_export_round_trip"),
    m("passage.bilstm-prompt-not-saved", "bge/weights.py", '"passage_prompt": tokenizer.passage_prompt})', "})",
      "tests/test_lstm.py::test_save_load_round_trip"),
    m("passage.bilstm-prompt-not-loaded", "bge/weights.py",
      'passage_prompt=passage_prompt if passage_prompt is not None else saved.get("passage_prompt"))',
      "passage_prompt=passage_prompt)", "tests/test_lstm.py::test_save_load_round_trip"),
    m("passage.card-snippet-encodes-passages-bare", "bge/card.py",
      "st_passage = ', prompt_name=\"document\"' if passage_prompt", "st_passage = '' if passage_prompt", PASSAGE_CARD),
    m("passage.card-sentence-says-none", "bge/card.py",
      'passage = f"passages `{passage_prompt}`" if passage_prompt else "passages none"', 'passage = "passages none"',
      PASSAGE_CARD),
    m("passage.evaluate-flag-ignored", "evaluate.py",
      "Embedder.load(str(folder), device=a.device, passage_prompt=a.passage_prompt)",
      "Embedder.load(str(folder), device=a.device)", "tests/test_evaluate.py::test_cli_two_models_one_table_and_json"),
    m("passage.score-flag-ignored", "bge/score.py",
      "Embedder.load(a.teacher, device=a.device, passage_prompt=a.passage_prompt)",
      "Embedder.load(a.teacher, device=a.device)", "tests/test_score.py::test_passage_prompt_reaches_the_teachers_passages"),
    # ---- --remine: negatives mined again by the model being trained ---------------------------------------
    m("remine.negatives-not-used", "bge/tasks.py", "        self.use_negatives(ids)\n        return ids", "        return ids",
      REMINE),
    m("remine.stale-prefetched-batches", "bge/training.py", 'batches.restart(trainer["micro_step"])  #', "pass  #",
      REMINE),
    m("remine.resume-forgets-negatives", "bge/training.py", 'if trainer["negatives"] is not None:', "if False:", REMINE),
    m("remine.other-ranks-keep-their-negatives", "bge/training.py",
      'if not info.main:\n                    retrieval.use_negatives(trainer["negatives"])', "if False:\n                    pass",
      "tests/test_distributed.py::test_torchrun_remine_trains_every_rank_on_rank_0s_negatives"),
    m("remine.also-after-the-last-epoch", "bge/training.py", "sampler.stage_steps < step < total_steps",
      "sampler.stage_steps < step", REMINE),
    # ---- --unlabeled-stage: the pseudo-pairs first, then the labelled data -----------------------------------
    m("stage.unlabeled-mixed-in", "bge/tasks.py", "self.stage = cfg.unlabeled_stage", "self.stage = False", STAGE),
    m("stage.validation-from-step-0", "bge/training.py", "since_stage = step - sampler.stage_steps",
      "since_stage = step", STAGE),
    m("stage.last-step-not-validated", "bge/training.py", "evaluate = since_stage % eval_every == 0 or step == total_steps",
      "evaluate = since_stage % eval_every == 0",
      "tests/test_distill_corpus.py::test_the_stage_lowers_the_distillation_loss_on_held_out_passages"),
    m("stage.without-pseudo-pairs", "bge/prepare.py", 'if cfg.unlabeled_stage and cfg.unlabeled == "off":', "if False:",
      STAGE_CHECKS),
    m("stage.two-stages", "bge/prepare.py", "if cfg.unlabeled_stage and cfg.distill_corpus:", "if False:", STAGE_CHECKS),
    # ---- benchmarks/quality.py's pairing, on which the README's one-knob rows rest ---------------------------
    m("quality.vs-every-seed-of-the-other", "benchmarks/quality.py", 'sorted(set(r["seeds"]) & set(other["seeds"]))',
      'sorted(set(r["seeds"]) | set(other["seeds"]))', VERSUS),
    m("quality.vs-seed-without-every-query", "benchmarks/quality.py",
      'if complete(r["seeds"][s]) and complete(other["seeds"][s])]', "]", VERSUS),
    m("quality.vs-pooled-unpaired", "benchmarks/quality.py", "return {**paired_difference(side(r), side(other)),",
      "return {**paired_difference(side(r), sorted(side(other))),", VERSUS),
]


def tracked_files(repo: Path) -> list[str]:
    """The files of the repository as a clone would have them, plus untracked ones git does not ignore."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout.split("\n")
    return [f for f in out if f and (repo / f).is_file()]


def copy_repo(dest: Path, files: list[str], source: Path = REPO) -> Path:
    """The files under dest/repo, with ../shared beside it when the real one exists (tests that need the shared
    data find it where they look: two levels above their own file)."""
    root = dest / "repo"
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / f, root / f)
    shared = REPO.parent / "shared"
    if shared.is_dir():
        (dest / "shared").symlink_to(shared)
    return root


def apply(root: Path, mut: Mutation) -> None:
    path = root / mut.file
    text = path.read_text(encoding="utf-8")
    count = text.count(mut.original)
    if count != 1:
        raise ValueError(f"{mut.file}: the original text occurs {count} times (want exactly once): {mut.original!r}")
    path.write_text(text.replace(mut.original, mut.replacement), encoding="utf-8")


def pytest(root: Path, tests: list[str], threads: int, timeout: int) -> tuple[int, str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                           env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        rc, out = -1, f"timed out after {timeout} s"
    return rc, out, time.perf_counter() - start


def run_one(mut: Mutation, snapshot: Path, files: list[str], threads: int, timeout: int) -> dict:
    """Apply one mutation to a fresh copy of the snapshot and run its tests: caught (exit 1: a test failed), missed
    (exit 0) or error (the mutation did not apply, no test ran, or the run timed out)."""
    with tempfile.TemporaryDirectory(prefix="bge-mutant-") as tmp:
        root = copy_repo(Path(tmp), files, snapshot)
        try:
            apply(root, mut)
        except ValueError as e:
            return {**asdict(mut), "result": "error", "seconds": 0.0, "detail": str(e)}
        rc, out, seconds = pytest(root, list(mut.tests), threads, timeout)
    result = {1: "caught", 0: "missed"}.get(rc, "error")
    lines = [l for l in out.splitlines() if l.strip()]
    detail = next((l for l in lines if l.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
    return {**asdict(mut), "result": result, "seconds": round(seconds, 1), "detail": detail[:300]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-j", "--jobs", type=int, default=2, help="mutations run at once (default 2)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="these mutations only (or name prefixes, "
                   "e.g. loss. or ckpt.)")
    p.add_argument("--list", action="store_true", help="list the mutations and their tests; run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the chosen tests")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    p.add_argument("--json", type=Path, default=REPO / "checkpoints" / "mutations.json", help="where the report goes")
    a = p.parse_args(argv)
    chosen = [mut for mut in MUTATIONS if not a.only or any(mut.name == o or mut.name.startswith(o) for o in a.only)]
    if not chosen:
        p.error(f"no mutation matches {a.only}")
    out = Console(width=200) if not sys.stdout.isatty() else Console()
    if a.list:
        for mut in chosen:
            out.print(f"{mut.name:48} {mut.file:20} {' '.join(mut.tests)}", markup=False, highlight=False)
        return 0
    files = tracked_files(REPO)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bge-snapshot-") as tmp:
        snapshot = copy_repo(Path(tmp), files)  # the working tree as it is now: edits made meanwhile do not leak in
        if not a.no_baseline:  # every chosen test passes unmutated, or "caught" would mean nothing
            tests = list(dict.fromkeys(t for mut in chosen for t in mut.tests))
            rc, log, seconds = pytest(snapshot, tests, os.cpu_count() or 1, a.timeout * 2)
            if rc != 0:
                out.print(log[-4000:], markup=False, highlight=False)
                out.print(f"the chosen tests fail without any mutation (exit {rc}); fix that first", style="bold red")
                return 2
            out.print(f"baseline: {len(tests)} test selections pass unmutated ({seconds:.0f} s)")
        rows = run_all(chosen, snapshot, files, threads, a, out)
    return report(rows, time.perf_counter() - began, a, out)


def run_all(chosen: list[Mutation], snapshot: Path, files: list[str], threads: int, a: argparse.Namespace,
            out: Console) -> list[dict]:
    """Every chosen mutation, a.jobs at a time, each result printed as it comes."""
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run_one, mut, snapshot, files, threads, a.timeout) for mut in chosen]
        rows = []
        for f in futures:
            rows.append(f.result())
            r = rows[-1]
            out.print(f"{len(rows):3}/{len(chosen)} {r['result']:6} {r['name']} ({r['seconds']:.0f} s)",
                      style={"caught": "green", "missed": "bold red"}.get(r["result"], "yellow"), highlight=False)
    return rows


def report(rows: list[dict], total: float, a: argparse.Namespace, out: Console) -> int:
    """The table, the JSON file, and the exit status: 0 only when every mutation was caught."""
    table = Table(title=f"mutation check: {sum(r['result'] == 'caught' for r in rows)} of {len(rows)} caught")
    for col in ("mutation", "file", "tests", "result", "s"):
        table.add_column(col, justify="right" if col == "s" else "left")
    for r in rows:
        style = {"caught": "green", "missed": "bold red"}.get(r["result"], "yellow")
        tests = ", ".join(t.split("::")[-1] if "::" in t else Path(t).name for t in r["tests"])
        table.add_row(r["name"], r["file"], tests, f"[{style}]{r['result']}[/]", f"{r['seconds']:.0f}")
    counts = {k: sum(r["result"] == k for r in rows) for k in ("caught", "missed", "error")}
    table.caption = (f"{counts['caught']} caught, {counts['missed']} missed, {counts['error']} errors · {total:.0f} s "
                     f"with -j {a.jobs} on {os.cpu_count()} cores")
    out.print(table)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"counts": counts, "seconds": round(total, 1), "jobs": a.jobs, "mutations": rows},
                                 indent=2) + "\n")
    out.print(f"wrote {a.json}")
    return 0 if counts["caught"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
