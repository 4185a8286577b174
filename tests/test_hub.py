"""bge.hub: downloads through huggingface_hub into the standard Hugging Face cache, from a local fake hub
(tests/fake_hub.py, which HF_ENDPOINT points at for the whole session), and offline use of that cache."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bge import hub
from bge.errors import UserError
from fake_hub import FakeHub, commit_of

REPO = "test-org/tiny-model"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small fake repo: the files bge reads (random bytes for weights: the hub never parses them) and some it must
    never download."""
    root = tmp_path / "served"
    (root / "1_Pooling").mkdir(parents=True)
    (root / "onnx").mkdir()
    (root / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (root / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    (root / "pytorch_model.bin").write_bytes(b"a pickle bge must never fetch")
    (root / "onnx" / "model.onnx").write_bytes(b"not for bge")
    return root


@pytest.fixture
def server(fake_hub: FakeHub, model_dir: Path) -> FakeHub:
    fake_hub.reset(model_dir)
    return fake_hub


WANTED = ["1_Pooling/config.json", "README.md", "config.json", "model.safetensors", "tokenizer.json", "vocab.txt"]


def same_files(a: Path, b: Path, files: list[str]) -> bool:
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def snapshot(cache: Path, repo: str = REPO, revision: str = "main") -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit_of(revision)


def test_download_into_the_standard_cache_safetensors_only(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    from huggingface_hub import scan_cache_dir

    cache = tmp_path / "cache"
    folder = hub.resolve_model(REPO, cache, quiet=True)
    assert folder == snapshot(cache)
    assert sorted(server.downloaded()) == WANTED  # never pytorch_model.bin, never onnx/
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == WANTED
    assert same_files(folder, model_dir, WANTED)
    assert (cache / "models--test-org--tiny-model" / "refs" / "main").read_text() == commit_of("main")
    assert [r.repo_id for r in scan_cache_dir(cache).repos] == [REPO]  # huggingface_hub's own view of its cache
    n = len(server.requests)
    assert hub.resolve_model(REPO, cache, quiet=True) == folder  # online: asks for the commit, downloads nothing
    assert [r.path for r in server.requests[n:]] == [f"/api/models/{REPO}/revision/main"]


def test_default_cache_is_hf_home(server: FakeHub) -> None:
    folder = hub.resolve_model("test-org/in-hf-home", quiet=True)
    home = Path(os.environ["HF_HOME"])  # conftest's: an empty HF_HOME for the session
    assert folder == snapshot(home / "hub", "test-org/in-hf-home")
    shutil.rmtree(home / "hub" / "models--test-org--in-hf-home")


def test_revision_and_token(server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret")
    folder = hub.resolve_model(f"{REPO}@v1.0", tmp_path, quiet=True)
    assert folder == snapshot(tmp_path, REPO, "v1.0")
    assert server.requests[0].path == f"/api/models/{REPO}/revision/v1.0"
    assert all(r.headers.get("authorization") == "Bearer secret" for r in server.requests)
    assert all(r.headers["user-agent"].startswith("bge/") for r in server.requests)


def test_real_minilm_files_download_byte_identical(fake_hub: FakeHub, tmp_path: Path) -> None:
    bundled = hub.bundled_minilm()
    fake_hub.reset(bundled)
    folder = hub.resolve_model("test-org/all-MiniLM-L6-v2", tmp_path, quiet=True)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= set(files)
    assert "data_config.json" not in files  # not among what bge reads
    assert same_files(folder, bundled, files)
    shutil.rmtree(tmp_path / "models--test-org--all-MiniLM-L6-v2")  # pytest keeps recent tmp dirs: not 90 MB each


def test_dropped_connection_resumes_from_the_last_chunk_written(server: FakeHub, model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 65_536)  # 10 MB by default: the file would be one chunk
    server.drop_after["model.safetensors"] = 100_000
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    gets = [r.headers.get("range") for r in server.requests
            if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert gets == [None, "bytes=65536-"]
    assert same_files(folder, model_dir, WANTED)


def test_failed_download_keeps_finished_files(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    server.status[r"/resolve/[^/]+/vocab\.txt$"] = 403  # a 5xx would be retried for 23 s
    with pytest.raises(UserError, match=r"could not download test-org/tiny-model") as e:
        hub.resolve_model(REPO, tmp_path, quiet=True)
    assert "\n" not in str(e.value)
    server.status.clear()
    n = len(server.requests)
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    assert [r.path.rsplit("/", 1)[1] for r in server.requests[n:] if r.method == "GET" and "/resolve/" in r.path] \
        == ["vocab.txt"]
    assert same_files(folder, model_dir, WANTED)


def test_offline_uses_the_cache_without_a_request(server: FakeHub, tmp_path: Path, hf_offline: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"^model test-org/tiny-model is not in the Hugging Face cache \(.*\) and "
                                        r"HF_HUB_OFFLINE=1: unset HF_HUB_OFFLINE"):
        hub.resolve_model(REPO, tmp_path, quiet=True)
    assert server.requests == []
    from huggingface_hub import constants, snapshot_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    snapshot_download(REPO, cache_dir=tmp_path)  # filled by huggingface_hub itself, as any HF tool would fill it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    server.reset(server.root)
    assert hub.resolve_model(REPO, tmp_path, quiet=True) == snapshot(tmp_path)
    assert server.requests == []


def test_offline_load_by_hub_id_from_a_prefilled_cache_in_a_fresh_process(
        fake_hub: FakeHub, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The user's case: huggingface_hub put the model in HF_HOME; with HF_HUB_OFFLINE=1 bge loads it by its id and
    `auto` finds the cached BAAI model, with every socket connect failing and the hub seeing no request."""
    from huggingface_hub import snapshot_download

    fake_hub.reset(tiny_model_dir)
    home = tmp_path / "home"
    for repo in (REPO, hub.AUTO_MODEL):
        snapshot_download(repo, cache_dir=home / "hub")
    fake_hub.reset(tiny_model_dir)
    script = ("import socket\n"
              "def refuse(*a): raise OSError('network call')\n"
              "socket.socket.connect = socket.socket.connect_ex = refuse\n"
              "import bge\n"
              f"print(bge.load({REPO!r}, device='cpu').encode(['a question']).shape)\n"
              "print(bge.load('auto', device='cpu').name)\n")
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "(1, 32)"
    assert out.stderr.startswith(f"model auto: using cached {hub.AUTO_MODEL} ({home / 'hub'}")
    assert fake_hub.requests == []


def closed_port_endpoint() -> str:
    """An http endpoint on a local port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_hub_one_line_error_and_auto_falls_back(tmp_path: Path) -> None:
    script = ("import sys\nfrom bge.console import run_cli\nfrom bge.hub import resolve_model\n"
              "run_cli(lambda: print(resolve_model(sys.argv[1])))\n")
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_ENDPOINT": closed_port_endpoint(), "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    bad = subprocess.run([sys.executable, "-c", script, REPO], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"error: could not download {REPO} from {env['HF_ENDPOINT']} (")
    assert bad.stderr.count("\n") == 1 and "HF_ENDPOINT" in bad.stderr
    auto = subprocess.run([sys.executable, "-c", script, "auto"], env=env, capture_output=True, text=True, timeout=120)
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.strip() == str(hub.bundled_minilm())
    assert auto.stderr.startswith(f"model auto: {hub.AUTO_MODEL} not reachable (")
    assert auto.stderr.count("\n") == 1 and "using bundled all-MiniLM-L6-v2" in auto.stderr
    assert time.monotonic() - start < 60  # refused connections fail fast, no long retry loop


def test_auto_cached_downloaded_or_bundled_with_one_notice(server: FakeHub, tmp_path: Path, hf_offline: None,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert hub.resolve_model("auto", tmp_path, quiet=True) == hub.bundled_minilm()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not cached and HF_HUB_OFFLINE=1; using bundled all-MiniLM-L6-v2" in err
    assert server.requests == []
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = hub.resolve_model("auto", tmp_path, quiet=True)  # the fake hub serves any repo
    assert folder == snapshot(tmp_path, hub.AUTO_MODEL)
    assert capsys.readouterr().err == f"model auto: downloaded {hub.AUTO_MODEL} to {folder}\n"
    n = len(server.requests)
    assert hub.resolve_model("auto", tmp_path, quiet=True) == folder
    assert capsys.readouterr().err == f"model auto: using cached {hub.AUTO_MODEL} ({folder})\n"
    assert len(server.requests) == n  # a cached auto model costs no request


@pytest.mark.parametrize("case, message", [
    ("repo", r"could not download test-org/tiny-model: repository not found on http://127\.0\.0\.1:\d+ \(check the "
             r"id; a private repo needs HF_TOKEN\)$"),
    ("revision", r"could not download test-org/tiny-model@v9: revision 'v9' not found in test-org/tiny-model$"),
    ("gated", r"could not download test-org/tiny-model: the repo is gated; accept its terms on the hub and set "
              r"HF_TOKEN$"),
    ("no-safetensors", r"test-org/tiny-model has no model.safetensors .*never unpickles pytorch_model.bin"),
    ("server-error", r"could not download test-org/tiny-model from http://127\.0\.0\.1:\d+ \(.*500.*\) and it is not "
                     r"in the Hugging Face cache"),
])
def test_errors_are_one_line(server: FakeHub, model_dir: Path, tmp_path: Path, case: str, message: str) -> None:
    name = REPO
    if case == "repo":
        server.missing_repos.add(REPO)
    elif case == "revision":
        server.missing_revisions.add("v9")
        name = f"{REPO}@v9"
    elif case == "gated":
        server.gated_repos.add(REPO)
    elif case == "no-safetensors":
        (model_dir / "model.safetensors").unlink()
    else:
        server.status[r"^/api/models/"] = 500
    with pytest.raises(UserError, match=message) as e:
        hub.resolve_model(name, tmp_path, quiet=True)
    assert "\n" not in str(e.value)
    assert not any(r.path.endswith(".bin") for r in server.requests)


def test_sharded_weights(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    (model_dir / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1000))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model_dir / hub.SHARD_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    assert same_files(folder, model_dir, [hub.SHARD_INDEX, *weight_map.values()])


def test_local_folder_and_bundled_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub.resolve_model(str(tmp_path)) == tmp_path
    bundled = hub.resolve_model("all-MiniLM-L6-v2")
    assert hub.resolve_model("sentence-transformers/all-MiniLM-L6-v2") == bundled
    assert (bundled / "model.safetensors").is_file() and (bundled / "1_Pooling" / "config.json").is_file()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./no/such/model", str(tmp_path / "missing"), "runs/best", ""):
        with pytest.raises(UserError, match="is not an existing folder"):
            hub.resolve_model(name)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file, not a model folder"):
        hub.resolve_model("weights.bin")


def test_hub_id_of(tmp_path: Path) -> None:
    assert hub.hub_id_of("BAAI/bge-small-en-v1.5@v2") == "BAAI/bge-small-en-v1.5"
    assert hub.hub_id_of("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub.hub_id_of(hub.bundled_minilm()) == "sentence-transformers/all-MiniLM-L6-v2"
    cached = tmp_path / "models--BAAI--bge-small-en-v1.5" / "snapshots" / ("a" * 40)
    cached.mkdir(parents=True)
    assert hub.hub_id_of(cached) == "BAAI/bge-small-en-v1.5"
    assert hub.hub_id_of(tmp_path) is None
    assert hub.hub_id_of("auto") is None


def test_network_guard_blocks_non_loopback() -> None:
    from conftest import NetworkBlocked

    start = time.monotonic()
    with socket.socket() as s, pytest.raises(NetworkBlocked, match="network access blocked"):
        s.connect(("10.255.255.1", 443))
    with socket.socket() as s, pytest.raises(NetworkBlocked):
        s.connect_ex(("10.255.255.1", 443))
    assert time.monotonic() - start < 0.5
