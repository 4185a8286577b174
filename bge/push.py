"""Upload an exported model folder (best/, final/, merged/, or any Embedder.save folder) to the Hugging Face hub.

    python -m bge.push checkpoints/<run>/best your-name/bike-repair-bge
    python -m bge.push checkpoints/<run>/best your-name/bike-repair-bge --private --branch v1

Through huggingface_hub: the repo is created if missing (create_repo), then every file of the folder goes up in one
commit. The token is HF_TOKEN (or the one `hf auth login` saved); HF_ENDPOINT names another hub. The model card's
usage snippets get the repo id in place of their placeholder path.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bge.card import MODEL_ID
from bge.console import console, run_cli
from bge.errors import UserError


def folder_files(folder: Path) -> list[Path]:
    """The files to upload: everything in the folder but hidden files and leftovers of an interrupted export."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder")
    if not (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").is_file():
        raise UserError(f"{folder}: no model.safetensors; pass an exported model folder (a run's best/, say)")
    if not (folder / "config.json").is_file() and not (folder / "bge_config.json").is_file():
        raise UserError(f"{folder}: no config.json; pass an exported model folder (a run's best/, say)")
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def push(folder: str | Path, repo_id: str, *, private: bool = False, branch: str | None = None,
         message: str | None = None) -> str:
    """Create `repo_id` if needed (and `branch`), upload `folder` in one commit; the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    from bge import __version__

    folder = Path(folder)
    files = folder_files(folder)
    operations = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        content = str(path)
        if rel == "README.md":  # the snippets load the model by its new name
            content = path.read_text(encoding="utf-8").replace(MODEL_ID, repo_id).encode()
        operations.append(CommitOperationAdd(path_in_repo=rel, path_or_fileobj=content))
    api = HfApi(library_name="bge", library_version=__version__)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if branch and branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.create_commit(repo_id, operations=operations, revision=branch,
                                   commit_message=message or f"Upload {folder.name} with bge {__version__}")
    except HFValidationError as e:
        raise UserError(f"repo id {repo_id!r} is not valid: {e}") from None
    except ValueError as e:  # the hub rejected the card's metadata
        raise UserError(f"could not push {folder} to {repo_id}: {' '.join(str(e).split())}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = "set HF_TOKEN to a token with write access" if status in (401, 403) else "try again later"
        raise UserError(f"could not push {folder} to {repo_id} (HTTP {status}): {hint}") from None
    except OSError as e:  # connection errors
        raise UserError(f"could not push {folder} to {repo_id} ({e}): check the network and HF_ENDPOINT") from None
    console.print(f"pushed {len(files)} files of {folder} to {url} ({commit.commit_url})", markup=False,
                  highlight=False, soft_wrap=True)
    return commit.commit_url


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Upload an exported model folder to the Hugging Face hub.",
                                allow_abbrev=False)
    p.add_argument("folder", help="an exported model folder (checkpoints/<run>/best, say)")
    p.add_argument("repo_id", help="namespace/name on the hub; created if it does not exist")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its setting)")
    p.add_argument("--branch", "--revision", dest="branch",
                   help="push to this branch (created if missing); default main")
    p.add_argument("--message", help="commit message")
    a = p.parse_args(argv)
    push(a.folder, a.repo_id, private=a.private, branch=a.branch, message=a.message)


if __name__ == "__main__":
    run_cli(main)
