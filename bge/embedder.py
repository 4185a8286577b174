"""The inference API: `bge.load(name)` returns an Embedder whose `encode(texts)` gives (n, d) embeddings."""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from rich.errors import LiveError
from rich.progress import Progress

from bge import card
from bge.console import progress
from bge.hub import resolve_model
from bge.lstm import BiLSTMEncoder
from bge.model import Encoder
from bge.tokenizer import Tokenizer
from bge import weights

SHOW_PROGRESS_AFTER_S = 2.0  # an encoding still running after this long gets a progress bar; quicker ones stay quiet


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There bf16 autocast trains about 2.3x and
    encodes about 2.6x faster than fp32 with the same fine-tuned quality (README, benchmarks/); elsewhere it is emulated
    and slower, so 'auto' stays fp32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(f is not None and f() for f in probes)


def autocast(device: torch.device, cpu_bf16: bool = False):
    """bf16 autocast on CUDA where supported (fp16 otherwise); on CPU only when asked, since fp32 is the reference."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


class Embedder:
    """A model and its tokenizer, on one device."""

    def __init__(self, model: Encoder | BiLSTMEncoder, tokenizer: Tokenizer, name: str = "", device: str | torch.device | None = None):
        self.device = torch.device(device) if device else default_device()
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def load(cls, name: str = "auto", *, device: str | torch.device | None = None, max_length: int | None = None,
             query_prompt: str | None = None, passage_prompt: str | None = None,
             cache_dir: str | Path | None = None) -> "Embedder":
        """A local folder, `all-MiniLM-L6-v2` (bundled), a hub id (`BAAI/bge-small-en-v1.5`), or `auto`; a prompt
        given here replaces the folder's."""
        folder = resolve_model(name, cache_dir=cache_dir)
        label = name if name != "auto" else str(folder)
        model, tokenizer = weights.load_model(folder, name=label, max_length=max_length, query_prompt=query_prompt,
                                              passage_prompt=passage_prompt)
        return cls(model, tokenizer, name=label, device=device)

    @property
    def dim(self) -> int:
        return self.model.dim

    def save(self, folder: str | Path, *, base: str | None = None, run: dict | None = None) -> Path:
        """Export a folder that transformers and sentence-transformers load unchanged (a BiLSTM: bge's own
        format, which only bge.load reads), with a model card README.md (bge.card): `base` is the model it came
        from (default: this one's name), `run` the story of the train.py run that made it."""
        meta = card.base_info(base or self.name)  # before the folder is replaced: it may be the base's own
        folder = weights.save(self.model, self.tokenizer, folder)
        card.write_card(folder, self, base=base, run=run, base_meta=meta)
        return folder

    def fingerprint(self) -> str:
        """A hash of the weights, configuration and tokenizer: two Embedders with the same one embed identically."""
        h = hashlib.blake2b(digest_size=16)
        # dropout rates are left out: they act only in training, so a base model set up for fine-tuning with
        # other rates (--attention-dropout 0) embeds exactly as before and may reuse its cached encodings and mining
        cfg = {k: v for k, v in self.model.cfg.to_dict().items() if "dropout" not in k}
        h.update(json.dumps(cfg, sort_keys=True).encode())
        h.update(self.tokenizer.tk.to_str().encode())
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @torch.inference_mode()
    def encode(self, texts: list[str], *, batch_size: int = 64, max_length: int | None = None, is_query: bool = False,
               is_passage: bool = False, prompt: str | None = None, as_numpy: bool = True,
               show_progress: bool | None = None, cpu_bf16: bool = False,
               description: str = "encoding") -> np.ndarray | torch.Tensor:
        """(n, d) float32 embeddings, in input order. Batches are built from length-sorted texts so each
        pads little; queries get the query instruction, retrieval passages (`is_passage`) the passage instruction
        (the tokenizer's, or `prompt`); other texts none."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single string in a list")
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first: a too-big batch fails at once
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()
        # show_progress None: the bar appears once the job has run SHOW_PROGRESS_AFTER_S, whatever its size
        bar = progress(transient=True, disable=show_progress is False)
        task = bar.add_task(description, total=len(texts))
        started = time.perf_counter()
        try:
            with autocast(self.device, cpu_bf16):
                for start in range(0, len(texts), batch_size):
                    due = show_progress or time.perf_counter() - started > SHOW_PROGRESS_AFTER_S
                    if due and not bar.disable and not bar.live.is_started:
                        _start(bar)
                    idx = order[start : start + batch_size]
                    ids, mask = self.tokenizer([texts[i] for i in idx], max_length=max_length, is_query=is_query,
                                               is_passage=is_passage, prompt=prompt)
                    emb = self.model.embed(ids.to(self.device), mask.to(self.device))
                    out[idx] = emb.float().cpu()
                    bar.advance(task, len(idx))
        finally:
            if bar.live.is_started:
                bar.stop()
        self.model.train(was_training)
        return out.numpy() if as_numpy else out


def _start(bar: Progress) -> None:
    """Show the bar; under an older rich that allows one live display at a time, a bar already on screen wins."""
    try:
        bar.start()
    except LiveError:
        bar.disable = True


def load(name: str = "auto", **kw) -> Embedder:
    """Shorthand for Embedder.load."""
    return Embedder.load(name, **kw)
