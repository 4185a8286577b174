"""Encoding throughput: bge's Embedder.encode against SentenceTransformer.encode on the same passages.

    python benchmarks/encode.py --model all-MiniLM-L6-v2 --n 1000 --vs sentence-transformers

Passages are real SciFact documents of 150-250 words; both sides use the same model folder, batch size and
max length, in the same process, alternating, median of --repeats runs (min-max shown).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bge import Embedder
from bge.hub import resolve_model
from benchmarks.common import fmt, machine, print_table, rate, scifact_passages, timed, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--n", type=int, default=1000, help="passages")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16 (autocast; on CPU, worth it "
                   "where the CPU has native bf16). Each side runs each one, so ratios compare like with like")
    p.add_argument("--vs", choices=["sentence-transformers"], default=None)
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args()

    texts = scifact_passages(a.n)
    folder = resolve_model(a.model)
    ours = Embedder.load(str(folder))
    device = ours.device
    precisions = [x.strip() for x in a.precisions.split(",") if x.strip()]
    if set(precisions) - {"fp32", "bf16"}:
        raise SystemExit(f"--precisions: fp32 and/or bf16, got {a.precisions}")
    runs = {}
    for prec in precisions:
        bf16 = prec == "bf16"
        # on CUDA, Embedder.encode autocasts by itself (bge.embedder.autocast); on CPU only when asked
        runs[f"bge {prec}"] = lambda bf16=bf16: ours.encode(texts, batch_size=a.batch_size, max_length=a.max_length,
                                                            cpu_bf16=bf16, show_progress=False)
    if a.vs:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(folder), device=str(device))
        st.max_seq_length = a.max_length
        for prec in precisions:
            def st_encode(bf16=prec == "bf16"):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    return st.encode(texts, batch_size=a.batch_size, show_progress_bar=False)
            runs[f"sentence-transformers {prec}"] = st_encode
    first = {name: fn() for name, fn in runs.items()}  # warm-up, and a check that both sides embed alike
    for prec in precisions if a.vs else []:
        x, y = first[f"bge {prec}"], first[f"sentence-transformers {prec}"]
        print(f"agreement ({prec}): min cosine bge vs sentence-transformers {(x * y).sum(1).min():.6f}")

    times = {name: [] for name in runs}
    for _ in range(a.repeats):  # alternate so drift in machine load hits both sides alike
        for name, fn in runs.items():
            times[name] += timed(fn, repeats=1, warmup=0)
    results = {name: rate(len(texts), t) for name, t in times.items()}
    rows = [[name, fmt(r), ""] for name, r in results.items()]
    if a.vs:
        st_best = max(results[f"sentence-transformers {p}"]["median"] for p in precisions)
        for row in rows:
            if row[0].startswith("bge"):
                prec = row[0].split()[1]
                same = results[row[0]]["median"] / results[f"sentence-transformers {prec}"]["median"]
                row[2] = f"{same:.2f}x same precision · {results[row[0]]['median'] / st_best:.2f}x their best"
    print_table(f"encode {len(texts)} SciFact passages · {Path(folder).name} · batch {a.batch_size} · "
                f"max length {a.max_length}", ["", "passages/s", "bge / sentence-transformers"], rows)
    write_json(a.json, {"machine": machine(), "args": vars(a), "results": results})


if __name__ == "__main__":
    main()
