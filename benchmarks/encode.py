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

from bge import Embedder
from bge.hub import resolve_model
from benchmarks.common import fmt, print_table, rate, scifact_passages, timed, write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--n", type=int, default=1000, help="passages")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU for bge")
    p.add_argument("--vs", choices=["sentence-transformers"], default=None)
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args()

    texts = scifact_passages(a.n)
    folder = resolve_model(a.model)
    ours = Embedder.load(str(folder))
    runs = {"bge": lambda: ours.encode(texts, batch_size=a.batch_size, max_length=a.max_length,
                                       cpu_bf16=a.cpu_bf16, show_progress=False)}
    if a.vs:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(str(folder), device=str(ours.device))
        st.max_seq_length = a.max_length
        runs["sentence-transformers"] = lambda: st.encode(texts, batch_size=a.batch_size, show_progress_bar=False)
    first = {name: fn() for name, fn in runs.items()}  # warm-up, and a check that both embed alike
    if a.vs:
        cos = (first["bge"] * first["sentence-transformers"]).sum(1)
        print(f"agreement: min cosine bge vs sentence-transformers {cos.min():.6f}")

    times = {name: [] for name in runs}
    for _ in range(a.repeats):  # alternate so drift in machine load hits both sides alike
        for name, fn in runs.items():
            times[name] += timed(fn, repeats=1, warmup=0)
    results = {name: rate(len(texts), t) for name, t in times.items()}
    rows = [[name, fmt(r)] for name, r in results.items()]
    if a.vs:
        ratio = results["bge"]["median"] / results["sentence-transformers"]["median"]
        rows.append(["ratio bge / sentence-transformers", f"{ratio:.2f}x"])
    print_table(f"encode {len(texts)} SciFact passages · {Path(folder).name} · batch {a.batch_size} · "
                f"max length {a.max_length}{' · bf16' if a.cpu_bf16 else ''}", ["", "passages/s"], rows)
    write_json(a.json, {"args": vars(a), "results": results})


if __name__ == "__main__":
    main()
