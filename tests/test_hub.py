"""bge.hub against a real local HTTP server that speaks the hub's `/{repo}/resolve/{revision}/{file}` layout."""

from __future__ import annotations

import filecmp
import http.server
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from bge import hub
from bge.errors import UserError

REPO = "test-org/tiny-model"


class FakeHub:
    """Serves `root` for any repo and revision, honours `Range: bytes=N-`, records requests, fails on demand."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str | None, str | None]] = []  # (path, Range, Authorization)
        self.fail: dict[str, int] = {}  # file -> HTTP status to answer with
        self.drop_after: dict[str, int] = {}  # file -> bytes sent before the connection drops (once)
        self.ignore_range = False
        self.redirect: set[str] = set()  # files answered with a 302 to `/cdn/{file}`, as the hub does for LFS files
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def files(self) -> list[str]:
        return [r[0].split("/resolve/main/", 1)[1] for r in self.requests if "/resolve/main/" in r[0]]

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub_ = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub_.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
                match = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)|/cdn/(.+)", self.path)
                file = (match[1] or match[2]) if match else ""
                path = hub_.root / file
                if match and match[1] in hub_.redirect:
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{file}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if file in hub_.fail or not path.is_file():
                    self.send_error(hub_.fail.get(file, 404))
                    return
                data = path.read_bytes()
                start = 0
                if (r := self.headers.get("Range")) and not hub_.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", r)[1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if file in hub_.drop_after:  # send a prefix, then close: the client sees a short body
                    body = body[:hub_.drop_after.pop(file)]
                    self.close_connection = True
                self.wfile.write(body)

        return Handler

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A small fake model: required files, two optional ones, random bytes for weights (the hub never parses them)."""
    root = tmp_path / "served"
    (root / "1_Pooling").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (root / "model.safetensors").write_bytes(os.urandom(300_000))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    return root


@pytest.fixture
def server(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    with FakeHub(model_dir) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        yield fake


def closed_port_endpoint() -> str:
    """An http endpoint on a local port nobody listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def same_files(a: Path, b: Path, files: list[str]) -> bool:
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


SERVED = ["config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"]


def test_full_download_then_cached(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    folder = hub.resolve_model(REPO, tmp_path / "cache", quiet=True)
    assert folder == tmp_path / "cache" / "test-org--tiny-model" / "main"
    assert same_files(folder, model_dir, SERVED)
    marker = json.loads((folder / ".complete").read_text())
    assert marker["files"] == {f: (model_dir / f).stat().st_size for f in SERVED}
    assert marker["endpoint"] == server.endpoint and marker["revision"] == "main"
    assert not (folder / "vocab.txt").exists() and not list(folder.rglob("*.incomplete"))
    assert set(server.files()) == set(hub.REQUIRED_FILES + hub.OPTIONAL_FILES)  # the optional 404s were asked once
    n = len(server.requests)
    assert hub.resolve_model(REPO, tmp_path / "cache", quiet=True) == folder
    assert len(server.requests) == n


def test_revision_and_token(server: FakeHub, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret")
    folder = hub.resolve_model(f"{REPO}@v1.0", tmp_path, quiet=True)
    assert folder == tmp_path / "test-org--tiny-model" / "v1.0"
    assert server.requests[0][0] == f"/{REPO}/resolve/v1.0/config.json"
    assert all(auth == "Bearer secret" for _, _, auth in server.requests)


def test_real_minilm_files_download_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundled = hub.bundled_minilm()
    with FakeHub(bundled) as fake:
        monkeypatch.setenv("HF_ENDPOINT", fake.endpoint)
        folder = hub.resolve_model("test-org/all-MiniLM-L6-v2", tmp_path, quiet=True)
    files = list(json.loads((folder / ".complete").read_text())["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "1_Pooling/config.json"} <= set(files)
    assert same_files(folder, bundled, files)
    shutil.rmtree(folder)  # pytest keeps recent tmp dirs: do not leave 90 MB behind each run


def test_redirect_keeps_range_and_drops_token(server: FakeHub, model_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret")
    server.redirect.add("model.safetensors")
    partial = tmp_path / "test-org--tiny-model" / "main" / "model.safetensors.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes((model_dir / "model.safetensors").read_bytes()[:1000])
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    assert same_files(folder, model_dir, SERVED)
    assert [r for r in server.requests if r[0] == "/cdn/model.safetensors"] == [("/cdn/model.safetensors",
                                                                                "bytes=1000-", None)]


def test_resume_partial_file(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "test-org--tiny-model" / "main" / "model.safetensors.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes((model_dir / "model.safetensors").read_bytes()[:123_456])
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    ranges = [r for path, r, _ in server.requests if path.endswith("/model.safetensors")]
    assert ranges == ["bytes=123456-"]
    assert same_files(folder, model_dir, SERVED)


def test_dropped_connection_then_retry_resumes(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    server.drop_after["model.safetensors"] = 100_000
    with pytest.raises(UserError, match="stopped at 100000 of 300000 bytes; run again to resume"):
        hub.resolve_model(REPO, tmp_path, quiet=True)
    folder = tmp_path / "test-org--tiny-model" / "main"
    assert not (folder / ".complete").exists() and not hub.is_complete(folder)
    n = len(server.requests)
    assert hub.resolve_model(REPO, tmp_path, quiet=True) == folder
    retry = server.requests[n:]
    assert [r for p, r, _ in retry if p.endswith("/model.safetensors")] == ["bytes=100000-"]
    assert not any(p.endswith("/config.json") and "1_Pooling" not in p for p, _, _ in retry)  # kept from run 1
    assert same_files(folder, model_dir, SERVED)


def test_server_ignoring_range_restarts_from_zero(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "test-org--tiny-model" / "main" / "model.safetensors.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 5000)  # garbage: appending the full body to it would corrupt the file
    server.ignore_range = True
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    assert same_files(folder, model_dir, SERVED)


def test_range_not_satisfiable_restarts(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "test-org--tiny-model" / "main" / "model.safetensors.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 400_000)  # longer than the served file: the server answers 416
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    assert same_files(folder, model_dir, SERVED)


def test_offline_empty_cache_fails_without_requests(server: FakeHub, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"not in the cache at .* and HF_HUB_OFFLINE=1"):
        hub.resolve_model(REPO, tmp_path, quiet=True)
    assert server.requests == []


def test_offline_complete_cache_works(server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    n = len(server.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model(REPO, tmp_path, quiet=True) == folder
    assert len(server.requests) == n


def test_unreachable_hub_id_fails_without_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    with pytest.raises(UserError, match=rf"could not download {REPO} from http://127\.0\.0\.1:\d+/{REPO}/resolve/main/"
                                        r"config\.json .*HF_ENDPOINT") as e:
        hub.resolve_model(REPO, tmp_path, quiet=True)
    assert "\n" not in str(e.value)


def test_auto_unreachable_falls_back_with_one_notice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_port_endpoint())
    assert hub.resolve_model("auto", tmp_path, quiet=True) == hub.bundled_minilm()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith("model auto: BAAI/bge-small-en-v1.5 not reachable (")
    assert "using bundled all-MiniLM-L6-v2" in err


def test_auto_offline_falls_back_and_cached_is_used(server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model("auto", tmp_path, quiet=True) == hub.bundled_minilm()
    assert "HF_HUB_OFFLINE=1; using bundled all-MiniLM-L6-v2" in capsys.readouterr().err
    assert server.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    folder = hub.resolve_model("auto", tmp_path, quiet=True)  # the fake hub serves any repo
    assert folder == tmp_path / "BAAI--bge-small-en-v1.5" / "main"
    assert capsys.readouterr().err.startswith("model auto: downloaded BAAI/bge-small-en-v1.5")
    n = len(server.requests)
    assert hub.resolve_model("auto", tmp_path, quiet=True) == folder
    assert capsys.readouterr().err.startswith("model auto: using cached BAAI/bge-small-en-v1.5")
    assert len(server.requests) == n


def test_missing_safetensors_is_clear(server: FakeHub, tmp_path: Path) -> None:
    server.fail["model.safetensors"] = 404
    with pytest.raises(UserError, match="has no model.safetensors .*never unpickles pytorch_model.bin"):
        hub.resolve_model(REPO, tmp_path, quiet=True)


@pytest.mark.parametrize("status, hint", [(401, "HF_TOKEN"), (403, "HF_TOKEN"), (404, "check the repo id"),
                                          (500, "try again later")])
def test_http_errors_on_required_file(server: FakeHub, tmp_path: Path, status: int, hint: str) -> None:
    server.fail["config.json"] = status
    with pytest.raises(UserError, match=rf"HTTP {status}\): .*{hint}"):
        hub.resolve_model(REPO, tmp_path, quiet=True)
    assert not hub.is_complete(tmp_path / "test-org--tiny-model" / "main")


def test_sharded_weights(server: FakeHub, model_dir: Path, tmp_path: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    (model_dir / "model-00002-of-00002.safetensors").write_bytes(os.urandom(1000))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (model_dir / hub.SHARD_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    folder = hub.resolve_model(REPO, tmp_path, quiet=True)
    assert same_files(folder, model_dir, [hub.SHARD_INDEX, *weight_map.values()])
    assert hub.is_complete(folder)


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


def test_network_guard_blocks_non_loopback() -> None:
    from conftest import NetworkBlocked

    start = time.monotonic()
    with socket.socket() as s, pytest.raises(NetworkBlocked, match="network access blocked"):
        s.connect(("10.255.255.1", 443))
    with socket.socket() as s, pytest.raises(NetworkBlocked):
        s.connect_ex(("10.255.255.1", 443))
    assert time.monotonic() - start < 0.5
