"""A local HTTP server that answers the Hugging Face hub requests huggingface_hub makes, for offline tests.

Downloads (snapshot_download): `GET /api/models/{repo}/revision/{rev}` (the commit), `GET /api/models/{repo}/tree/
{commit}?recursive=...` (the file list), then per file `HEAD` and `GET /{repo}/resolve/{commit}/{file}` with the
headers the client reads (X-Repo-Commit, ETag, Content-Length) and `Range: bytes=N-` honoured. Uploads (create_repo,
create_branch, create_commit with every file sent inline): `POST /api/repos/create`, `POST /api/validate-yaml`,
`POST /api/models/{repo}/branch/{branch}`, `POST /api/models/{repo}/preupload/{rev}`, `POST /api/models/{repo}/
commit/{rev}` (NDJSON).

Every repo serves the files of one local folder (`root`); each revision name maps to its own fixed commit hash.
huggingface_hub reads HF_ENDPOINT once, when it is imported, so tests/conftest.py starts one FakeHub for the whole
session (session_hub) and points HF_ENDPOINT at it; the `fake_hub` fixture resets it for each test.
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import http.server
import json
import os
import re
import shutil
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path


def commit_of(revision: str) -> str:
    """The fake commit hash of a branch or tag name (a 40-hex revision is its own commit)."""
    return revision if re.fullmatch(r"[0-9a-f]{40}", revision) else hashlib.sha1(revision.encode()).hexdigest()


@dataclass
class Request:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # names in lower case
    body: bytes = b""


@dataclass
class Pushed:
    """What the fake hub received for one repo through the upload endpoints."""

    private: bool | None = None
    branches: list[str] = field(default_factory=list)
    commits: list[dict] = field(default_factory=list)  # {"revision", "summary", "files": {path: bytes}}


class FakeHub:
    """Serves `root` for any repo; records requests; `missing_repos`, `missing_revisions`, `gated_repos`,
    `status` and `drop_after` make it fail on demand."""

    def __init__(self, root: Path | None = None):
        self.reset(root)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def reset(self, root: Path | None) -> None:
        """Serve `root`, forget requests, pushes and planned failures."""
        self.root = Path(root) if root is not None else None
        self.requests: list[Request] = []
        self.missing_repos: set[str] = set()
        self.missing_revisions: set[str] = set()
        self.gated_repos: set[str] = set()
        self.status: dict[str, int] = {}  # path regex -> HTTP status answered instead
        self.drop_after: dict[str, int] = {}  # file -> bytes sent before the connection drops (once)
        self.pushed: dict[str, Pushed] = {}

    def __enter__(self) -> "FakeHub":
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self) -> list[str]:
        """Every file under root, as repo paths."""
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def downloaded(self) -> list[str]:
        """The repo files fetched with GET, in request order."""
        out = []
        for r in self.requests:
            m = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", r.path)
            if r.method == "GET" and m:
                out.append(urllib.parse.unquote(m[1]))
        return out

    # ---- answers ----------------------------------------------------------------------------------------
    def _answer(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        url = urllib.parse.urlsplit(h.path)
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0)) if method == "POST" else b""
        req = Request(method, url.path, urllib.parse.parse_qs(url.query), {k.lower(): v for k, v in h.headers.items()},
                      body)
        self.requests.append(req)
        for pattern, status in self.status.items():
            if re.search(pattern, url.path):
                return self._send(h, status, b"{}", {"Content-Type": "application/json"})
        if method == "POST":
            return self._upload(h, req)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", url.path)
        if m:
            repo, kind, rev = m[1], m[2], urllib.parse.unquote(m[3])
            if repo in self.missing_repos or self.root is None:
                return self._error(h, 404, "RepoNotFound")
            if repo in self.gated_repos:
                return self._error(h, 403, "GatedRepo")
            if rev in self.missing_revisions:
                return self._error(h, 404, "RevisionNotFound")
            if kind == "revision":
                info = {"id": repo, "modelId": repo, "sha": commit_of(rev), "private": False,
                        "siblings": [{"rfilename": f} for f in self.files()]}
                return self._json(h, info)
            return self._json(h, self._tree())
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
        if m:
            repo, rev, file = m[1], urllib.parse.unquote(m[2]), urllib.parse.unquote(m[3])
            if repo in self.missing_repos or self.root is None:
                return self._error(h, 404, "RepoNotFound")
            path = self.root / file
            if not path.is_file():
                return self._error(h, 404, "EntryNotFound")
            return self._file(h, method, path, file, commit_of(rev))
        self._send(h, 404, b"not found", {})

    def _tree(self) -> list[dict]:
        entries = [{"type": "directory", "oid": "0" * 40, "size": 0, "path": p.relative_to(self.root).as_posix()}
                   for p in sorted(self.root.rglob("*")) if p.is_dir()]
        for f in self.files():
            data = (self.root / f).read_bytes()
            entries.append({"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": f})
        return entries

    def _file(self, h, method: str, path: Path, file: str, commit: str) -> None:
        data = path.read_bytes()
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if rng and method == "GET":
            start = int(rng[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if start else 200
        if method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return self._send(h, status, b"", headers)
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        cut = self.drop_after.pop(file, None)
        if cut is not None:  # promise the whole body, send part of it, and close: a dropped connection
            h.send_response(status)
            for k, v in headers.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            return
        self._send(h, status, body, headers)

    def _upload(self, h, req: Request) -> None:
        if req.path == "/api/validate-yaml":  # create_commit asks before it uploads a README.md
            return self._json(h, {"errors": [], "warnings": []})
        if req.path == "/api/repos/create":
            d = json.loads(req.body)
            repo = f"{d['organization']}/{d['name']}" if d.get("organization") else d["name"]
            self.pushed.setdefault(repo, Pushed()).private = d.get("visibility", "public") == "private"
            return self._json(h, {"url": f"{self.endpoint}/{repo}", "name": repo})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/([^/]+)", req.path)
        if not m:
            return self._send(h, 404, b"not found", {})
        repo, kind, rev = m[1], m[2], urllib.parse.unquote(m[3])
        pushed = self.pushed.setdefault(repo, Pushed())
        if kind == "branch":
            pushed.branches.append(rev)
            return self._json(h, {})
        if kind == "preupload":  # every file goes inline in the commit (no LFS)
            files = json.loads(req.body)["files"]
            return self._json(h, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                            for f in files]})
        commit = {"revision": rev, "summary": "", "files": {}}
        for line in req.body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                commit["summary"] = item["value"]["summary"]
            elif item["key"] == "file":
                commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        pushed.commits.append(commit)
        return self._json(h, {"commitUrl": f"{self.endpoint}/{repo}/commit/{'c' * 40}", "commitOid": "c" * 40,
                              "pullRequestUrl": None})

    def _json(self, h, obj) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _error(self, h, status: int, code: str) -> None:
        self._send(h, status, json.dumps({"error": code}).encode(),
                   {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": code})

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict[str, str]) -> None:
        h.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the hub: httpx reuses connections

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub._answer(self, "GET")

            def do_HEAD(self) -> None:
                hub._answer(self, "HEAD")

            def do_POST(self) -> None:
                hub._answer(self, "POST")

        return Handler


_SESSION: list[FakeHub] = []


def session_hub() -> FakeHub:
    """The process's one FakeHub, started on first call. huggingface_hub reads its variables once, when it is first
    imported (after conftest.py): the whole session, and every subprocess a test starts, sees this hub on loopback and
    an empty HF_HOME, never the user's cache, token or network. (conftest.py may be imported twice, as `conftest` and
    as `tests.conftest`: the hub and the variables must still be set once.)"""
    if not _SESSION:
        for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                    "HF_TOKEN_PATH"):
            os.environ.pop(var, None)
        home = tempfile.mkdtemp(prefix="bge-tests-hf-home-")
        hub = FakeHub().__enter__()
        os.environ.update(HF_HOME=home, HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_TELEMETRY="1")
        atexit.register(shutil.rmtree, home, ignore_errors=True)
        atexit.register(hub.__exit__)
        _SESSION.append(hub)
    return _SESSION[0]
