"""The model card: a README.md in every exported folder, with YAML metadata the Hugging Face hub reads (base_model,
library_name, pipeline_tag, tags, the base model's license) and usage for bge, sentence-transformers and transformers.

A folder exported by a train.py run (best/, final/, merged/) also tells the run's story: base model, data files and
their sha256, split sizes, loss and key settings, the command. Its held-out test table is only known at the end of
the run, so it sits between two markers that `fill_results` rewrites once results.json exists.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from bge import hub
from bge.lstm import BiLSTMEncoder

if TYPE_CHECKING:  # at run time these come in as arguments: importing them here would be circular
    from bge.config import TrainConfig
    from bge.embedder import Embedder

RESULTS_START, RESULTS_END = "<!-- bge:test-results -->", "<!-- /bge:test-results -->"
MODEL_ID = "path/to/this/folder"  # in the usage snippets; python -m bge.push puts the repo id in its place
ROLES = {"best": "the weights with the best validation score", "final": "the weights after the last training step",
         "merged": "the base and fine-tuned weights mixed (LM-Cocktail), the mix chosen on validation"}
COUNT_NAMES = {"test_queries": "queries", "test_corpus": "passages", "test_pairs": "pairs", "test_rows": "rows"}
SETTINGS = ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "max_query_length", "max_passage_length",
            "warmup_ratio", "schedule", "weight_decay", "precision", "seed")


# ---- what the card says about the base model and the data -----------------------------------------------
def base_info(name: str) -> tuple[str | None, str | None]:
    """(hub id, license) of the model `name` (a --model value or a folder), without the network: the id from the name
    or the cache folder, else the base_model its own card names; the license from its card."""
    folder = hub.local_folder(name)
    repo = hub.hub_id_of(name) or (hub.hub_id_of(folder) if folder else None)
    data = read_card_data(folder / "README.md") if folder else {}
    return repo or _single(data.get("base_model")), _single(data.get("license"))


def read_card_data(path: Path) -> dict:
    """The YAML metadata of a model card ({} when there is none or it does not parse)."""
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # a third-party README: anything may be in it, and the card is a courtesy
        return {}


def _single(value) -> str | None:
    return value[0] if isinstance(value, list) and value else value if isinstance(value, str) else None


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: str | Path) -> str | None:
    """sha256 of a file; of a folder (a BEIR dataset), of its files' relative names and sha256s in order. None when
    the path is gone (a run resumed from another directory). Cached by size and mtime: best/ is exported often."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        listing = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_of(p)}\n" for p in files)
        return hashlib.sha256(listing.encode()).hexdigest()
    return None


def loss_summary(cfg: TrainConfig, tasks: list[str]) -> list[str]:
    """One line per task on what the loss was."""
    lines = []
    if "retrieval" in tasks:
        negatives = cfg.group_size - 1
        line = (f"retrieval: InfoNCE on cosine scores at temperature {cfg.temperature:g}, {cfg.group_size} passages "
                f"per query (1 positive + {negatives} hard negative{'s' * (negatives != 1)})"
                + (", in-batch negatives" if cfg.in_batch_negatives else ", no in-batch negatives")
                + (", symmetric (passage-to-query term too)" if cfg.symmetric else ""))
        if cfg.kd_weight:
            line += f", + {cfg.kd_weight:g} x KL to teacher scores (temperature {cfg.kd_temperature:g})"
        if cfg.distill_from:
            line += (f", distilled from {cfg.distill_from} ({cfg.distill_loss} x {cfg.distill_weight:g}, "
                     f"KL x {cfg.distill_kl:g})")
        lines.append(line)
    if "sts" in tasks:
        lines.append(f"sts: CoSENT, scale {cfg.cosent_scale:g}" if cfg.sts_loss == "cosent" else "sts: cosine MSE")
    if "classification" in tasks:
        lines.append(f"classification: {cfg.classification_loss} (same label = positive)"
                     if cfg.classification_loss == "contrastive" else f"classification: {cfg.classification_loss}")
    if cfg.matryoshka_dims:
        lines.append(f"Matryoshka: the loss again at {cfg.matryoshka_dims} dimensions")
    return lines


def run_story(cfg: TrainConfig, tasks: dict, run_dir: Path, role: str, lr: float) -> dict:
    """What a train.py run's card tells (JSON-able): where the weights came from and how they were trained."""
    roles = (("training data", "data"), ("extra training data, never held out", "extra_data"), ("validation", "val"),
             ("test", "test"), ("evaluation corpus", "corpus"), ("general probe", "general_probe"))
    files = [(label, path) for label, key in roles for path in
             (getattr(cfg, key) if isinstance(getattr(cfg, key), tuple) else [getattr(cfg, key)]) if path]
    command = run_dir / "command.txt"
    return {
        "run": run_dir.name, "role": role, "base": cfg.model,
        "data": [{"role": label, "name": Path(path).name, "sha256": sha256_of(path)} for label, path in files],
        "splits": {name: {"train": len(t.train)} if not t.labelled else  # pseudo-pairs, a distillation corpus
                   {"train": len(t.train), "validation": t.size(t.val) if t.val is not None else 0,
                    "test": t.size(t.test_data) if t.test_data is not None else 0} for name, t in tasks.items()},
        "loss": loss_summary(cfg, list(tasks)),
        "settings": {k: (lr if k == "lr" else getattr(cfg, k)) for k in SETTINGS},
        "command": command.read_text().strip() if command.exists() else "",
        "config": cfg.to_dict(),
    }


# ---- writing the card ----------------------------------------------------------------------------------------
def write_card(folder: str | Path, embedder: Embedder, *, base: str | None = None, run: dict | None = None,
               base_meta: tuple[str | None, str | None] | None = None) -> Path:
    """Write `folder`/README.md for an exported `embedder`. `base`: the model it came from (default: its own name);
    `run`: run_story(...) for a train.py export; `base_meta`: (hub id, license) when the caller already read them."""
    from huggingface_hub import ModelCardData

    base = base or embedder.name
    repo, license = base_meta or base_info(base)
    cfg = embedder.model.cfg
    bilstm = isinstance(embedder.model, BiLSTMEncoder)
    tags = ["bge", "sentence-similarity", "feature-extraction"] + ([] if bilstm else ["sentence-transformers"])
    tags += [t for t in (run or {}).get("splits", {})]
    meta = ModelCardData(base_model=repo, license=license, pipeline_tag="sentence-similarity",
                         library_name=None if bilstm else "sentence-transformers", tags=tags)
    pooling = ("BiLSTM attention pooling" if bilstm else "CLS pooling" if cfg.pooling == "cls"
               else f"{cfg.pooling} pooling")
    prompt, passage_prompt = embedder.tokenizer.query_prompt, embedder.tokenizer.passage_prompt
    title = f"{Path(folder).name} · {run['run']}" if run else Path(folder).name
    parts = [f"---\n{meta.to_yaml()}\n---\n", f"# {title}\n",
             f"A text-embedding model {'fine-tuned with' if run else 'exported by'} bge (the Python package "
             f"`bge-finetune`) from {_model_link(repo, base)}: {embedder.dim} dimensions, {pooling}, L2-normalised, "
             f"cosine similarity, up to {embedder.tokenizer.max_length} tokens. "
             + _instructions(prompt, passage_prompt)]
    if bilstm:
        parts.append("\nA gated BiLSTM in bge's own format: **only bge loads it** (not transformers or "
                     "sentence-transformers).")
    if run:
        parts.append(_story(run, repo))
        parts.append(f"\n## Results on the held-out test set\n\n{RESULTS_START}\n{_pending(run['role'])}\n"
                     f"{RESULTS_END}\n")
    parts.append(_usage(bilstm, cfg, prompt, passage_prompt))
    path = Path(folder) / "README.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _instructions(query_prompt: str, passage_prompt: str) -> str:
    """The card's sentence on the instructions that bge and sentence-transformers prefix."""
    if not query_prompt and not passage_prompt:
        return "No query instruction."
    query = f"Queries take the instruction `{query_prompt}`" if query_prompt else "Queries take no instruction"
    passage = f"passages `{passage_prompt}`" if passage_prompt else "passages none"
    return f"{query}; {passage}."


def _model_link(repo: str | None, base: str) -> str:
    return f"[{repo}](https://huggingface.co/{repo})" if repo else f"`{base}`"


def _story(run: dict, repo: str | None) -> str:
    role = run["role"]
    lines = ["\n## Training run\n", f"- run: `{run['run']}`; this folder is `{role}/`: {ROLES.get(role, role)}",
             f"- base model: {_model_link(repo, run['base'])}"]
    for d in run["data"]:
        lines.append(f"- {d['role']}: `{d['name']}` (sha256 `{d['sha256'] or 'unavailable'}`)")
    lines += ["", "| task | train | validation | test |", "|---|---|---|---|"]
    count = lambda s, part: f"{s[part]:,}" if part in s else "-"  # pseudo-pairs and distillation text: training only
    lines += [f"| {task} | {count(s, 'train')} | {count(s, 'validation')} | {count(s, 'test')} |"
              for task, s in run["splits"].items()]
    lines += ["", "Loss:", *(f"- {l}" for l in run["loss"]), "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v:g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in run["settings"].items()]
    if run["command"]:
        lines += ["", "Command:", "", "```", run["command"], "```"]
    lines += ["", "<details><summary>Full configuration (train.py's TrainConfig)</summary>", "", "```json",
              json.dumps(run["config"], indent=2), "```", "", "</details>"]
    return "\n".join(lines)


def _pending(role: str) -> str:
    if role == "final":
        return "The held-out test table is in the card of `best/` (the weights the run chose); these are the last ones."
    return "The run had not finished when this card was written: its end adds the held-out test table here."


def _usage(bilstm: bool, cfg, prompt: str, passage_prompt: str) -> str:
    query, passage = "how do I stop my disc brakes squealing?", "Squealing discs are usually contaminated pads."
    lines = ["\n## Usage\n", "### bge\n", "```python", "import bge", "",
             f'model = bge.load("{MODEL_ID}")',
             f'q = model.encode(["{query}"], is_query=True)  # the query instruction is added for you',
             f'd = model.encode(["{passage}"], is_passage=True)' + ("  # and the passage one" if passage_prompt else ""),
             "print(q @ d.T)", "```"]
    if bilstm:
        return "\n".join(lines) + "\n"
    st_query = ', prompt_name="query"' if prompt else ""
    st_passage = ', prompt_name="document"' if passage_prompt else ""
    pool = ("emb = out.last_hidden_state[:, 0]  # CLS pooling" if cfg.pooling == "cls" else
            'mask = batch["attention_mask"].unsqueeze(-1).float()\n'
            "emb = (out.last_hidden_state * mask).sum(1) / mask.sum(1)  # mean pooling")
    prefix = json.dumps(prompt + query, ensure_ascii=False)
    lines += ["\n### sentence-transformers\n", "```python", "from sentence_transformers import SentenceTransformer", "",
              f'model = SentenceTransformer("{MODEL_ID}")',
              f'q = model.encode(["{query}"]{st_query})', f'd = model.encode(["{passage}"]{st_passage})',
              "print(model.similarity(q, d))", "```",
              "\n### transformers\n", "```python", "import torch",
              "from transformers import AutoModel, AutoTokenizer", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{MODEL_ID}")',
              f'model = AutoModel.from_pretrained("{MODEL_ID}").eval()',
              f'batch = tokenizer([{prefix}], padding=True, truncation=True, return_tensors="pt")',
              "with torch.no_grad():", "    out = model(**batch)", *pool.split("\n"),
              "emb = torch.nn.functional.normalize(emb, dim=-1)", "```"]
    return "\n".join(lines) + "\n"


# ---- the end of a run: the held-out test table ------------------------------------------------------------
def fill_results(run_dir: str | Path, results: dict) -> None:
    """Put the base-vs-fine-tuned table of results.json into the cards of best/ and merged/."""
    run_dir = Path(run_dir)
    per_task = results.get("tasks") or ({"": results} if "base" in results else {})
    for role in ("best", "merged"):
        card = run_dir / role / "README.md"
        if not card.exists():
            continue
        text = card.read_text(encoding="utf-8")
        if RESULTS_START not in text or RESULTS_END not in text:
            continue
        head, rest = text.split(RESULTS_START, 1)
        card.write_text(head + RESULTS_START + "\n" + results_markdown(results, per_task, role) + "\n"
                        + RESULTS_END + rest.split(RESULTS_END, 1)[1], encoding="utf-8")


def results_markdown(results: dict, per_task: dict, role: str) -> str:
    """The ending's table(s) as markdown: one row per metric, base / fine-tuned / change (and the merged mix)."""
    best_key = next((k for k in results if k.startswith("best_val_")), None)
    lines = [f"best/ is the model of step {results.get('best_step')} of {results.get('steps')}"
             + (f" (validation {best_key.removeprefix('best_val_')} {results[best_key]:.4f})"
                if best_key and isinstance(results.get(best_key), float) else "")
             + (f"; merged/ mixes it with the base model at ratio {results['merge_ratio']:g}"
                if "merge_ratio" in results else "") + f". This folder is `{role}/`."]
    if not per_task:
        return "\n".join(lines + ["", "The run had no held-out test set (and no general probe)."])
    from bge.tasks import TASK_TYPES  # here: bge.tasks exports through this module

    headline = {m for t in TASK_TYPES.values() for m in t.table_metrics}  # the rows of train.py's ending table
    for task, r in per_task.items():
        merged = r.get("merged")
        counts = ", ".join(f"{v:,} {COUNT_NAMES.get(k, k)}" for k, v in r.items() if k in COUNT_NAMES)
        lines += ["", f"**{task or 'held-out test'}**" + (f" ({counts})" if counts else ""), ""]
        header = ["metric", "base", "fine-tuned", "change"] + ([f"merged {results.get('merge_ratio', 0):g}", "change"]
                                                               if merged else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        shown = [m for m in r["base"] if m in headline or m.startswith("probe/")] or list(r["base"])
        for m in shown:
            b, t = r["base"][m], r["fine_tuned"][m]
            cells = [m, _num(b), _num(t), _change(t, b)] + ([_num(merged[m]), _change(merged[m], b)] if merged else [])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None or v != v else f"{v:.4f}"  # v != v: NaN (a metric the base model has not got)


def _change(new, old) -> str:
    return "" if old is None or old != old or new is None else f"{new - old:+.4f}"
