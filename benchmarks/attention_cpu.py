"""How far the written-out attention beats SDPA in bf16 training on this CPU (the table in bge/dropout.py).

    python benchmarks/attention_cpu.py --lengths 16,64,128,192,256,320,384,512 --repeats 5

One layer's attention, forward + backward, bf16, 12 heads of 32 dimensions, batch sized so every length holds about
4,096 tokens, a quarter of half the rows padded; median of --repeats after one warm-up. Prints both times, their
ratio, this CPU's kind and the limit bge/dropout.py uses for it. Both paths compute the same function, so the limit
decides speed only; on a shared machine run it twice, as a ratio near 1 moves from run to run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import print_table, write_json
from bge.dropout import attention, cpu_kind, written_out_limit


def seconds(fn, length: int, heads: int, dim: int, repeats: int) -> float:
    """Median seconds of fn(q, k, v, mask) forward + backward on a bf16 batch of about 4,096 tokens."""
    batch = max(2, 4096 // length)
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = torch.ones(batch, 1, 1, length, dtype=torch.bool)
    mask[: batch // 2, ..., length * 3 // 4:] = False
    times = []
    for i in range(repeats + 1):
        t = time.perf_counter()
        fn(q, k, v, mask).float().sum().backward()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="16,64,128,192,256,320,384,512")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    written = lambda q, k, v, m: attention(q, k, v, m, 0.0)
    sdpa = lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    rows = []
    for length in (int(x) for x in a.lengths.split(",")):
        w, s = (seconds(fn, length, a.heads, a.dim, a.repeats) for fn in (written, sdpa))
        rows.append({"length": length, "written_out_ms": 1e3 * w, "sdpa_ms": 1e3 * s, "sdpa_over_written": s / w})
    print_table(f"bf16 attention, forward + backward, {a.heads} heads x {a.dim} · CPU kind {cpu_kind()} · "
                f"bge/dropout.py writes it out up to {written_out_limit()} tokens",
                ["tokens", "written out ms", "SDPA ms", "SDPA / written out"],
                [[str(r["length"]), f"{r['written_out_ms']:.1f}", f"{r['sdpa_ms']:.1f}", f"{r['sdpa_over_written']:.2f}"]
                 for r in rows])
    write_json(a.json, {"cpu_kind": cpu_kind(), "limit": written_out_limit(), "rows": rows})


if __name__ == "__main__":
    main()
