"""Weight merging against forgetting (LM-Cocktail, Xiao et al., 2023): a fine-tuned model interpolated with
its base keeps much of the domain gain while giving back general ability the fine-tune cost.

    merged = base + ratio * (fine_tuned - base)      ratio 0 = the base model, 1 = the fine-tuned one

`merge_state_dicts` is the pure function; `merged_embedder` builds an Embedder from two; `choose_ratio` picks a
mix from validation scores; `sweep` validates the mixes of a run (--merge-sweep) and chooses one.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

from bge.console import console
from bge.embedder import Embedder


def merge_state_dicts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """base + ratio * (tuned - base) for every tensor, in float32 and cast back to the tuned tensor's dtype.
    torch.lerp computes the end nearer the weight from that end, so ratio 0 gives base and 1 gives tuned exactly."""
    if set(base) != set(tuned):
        raise ValueError(f"the models have different tensors: {sorted(set(base) ^ set(tuned))[:6]}")
    out = {}
    for name, t in tuned.items():
        b = base[name]
        if b.shape != t.shape:
            raise ValueError(f"{name}: shape {tuple(b.shape)} in the base model but {tuple(t.shape)} fine-tuned")
        if not t.is_floating_point():  # e.g. position-id buffers: the same in both
            out[name] = t.clone()
            continue
        out[name] = torch.lerp(b.float(), t.float(), float(ratio)).to(t.dtype)
    return out


def merged_embedder(base: Embedder, tuned: Embedder, ratio: float) -> Embedder:
    """A new Embedder with the weights of base and tuned mixed at `ratio` and the fine-tuned model's tokenizer
    (query instruction included); neither input is changed."""
    if base.model.cfg.to_dict() != tuned.model.cfg.to_dict():
        raise ValueError("cannot merge models of different architectures")
    model = copy.deepcopy(tuned.model)
    model.load_state_dict(merge_state_dicts(base.model.state_dict(), tuned.model.state_dict(), ratio))
    return Embedder(model, tuned.tokenizer, name=f"{tuned.name} merged at {ratio:g}", device=tuned.device)


def parse_ratios(text: str) -> list[float]:
    """'0.25,0.5,0.75' -> [0.25, 0.5, 0.75], each in [0, 1]."""
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        ratios = []
    if not ratios or not all(0.0 <= r <= 1.0 for r in ratios):
        raise ValueError(f"expected ratios in [0, 1] separated by commas, got {text!r}")
    return sorted(set(ratios))


def choose_ratio(domain: dict[float, float], probe: dict[float, float] | None, tolerance: float) -> float:
    """The ratio with the best domain score among those whose probe score is at most `tolerance` below the base
    model's (ratio 0, which must be present); without a probe, simply the best domain score. Ties go to the
    smaller ratio, the one nearer the base model."""
    candidates = sorted(domain)
    if probe is not None:
        if 0.0 not in probe:
            raise ValueError("choose_ratio needs the base model's probe score (ratio 0)")
        candidates = [r for r in candidates if probe[r] >= probe[0.0] - tolerance]
    return max(candidates, key=lambda r: (domain[r], -r))


def sweep(base: Embedder, tuned: Embedder, ratios: list[float], score: Callable[[Embedder], dict[str, float]],
          known: dict[float, dict[str, float] | None], tolerance: float,
          label: str = "score") -> tuple[float, dict[float, dict[str, float]]]:
    """(the chosen ratio, the validation scores of every mix): each ratio's mix scored by `score` (val/score, what
    chooses best/, and probe/<metric>), the ends taken from `known` when training validated them (0: the base model at
    step 0, 1: best/), and the ratio chosen by choose_ratio on val/score, held to the probe's headline metric.
    `label` names val/score in the line that says the choice."""
    scores = {0.0: known.get(0.0) or score(base), 1.0: known.get(1.0) or score(tuned)}
    for r in ratios:
        if r not in scores:
            scores[r] = score(merged_embedder(base, tuned, r))
            console.print(f"merged at {r:g}: " + " · ".join(f"{k} {v:.4f}" for k, v in scores[r].items()
                                                            if k == "val/score" or k.startswith("probe/")))
    headline = next((k for k in scores[0.0] if k.startswith("probe/")), None)
    ratio = choose_ratio({r: s["val/score"] for r, s in scores.items()},
                         {r: s[headline] for r, s in scores.items()} if headline else None, tolerance)
    console.print(f"merge sweep: chose ratio {ratio:g} (best validation {label} with {headline or 'no probe'} at most "
                  f"{tolerance} below the base model's)")
    return ratio, scores
