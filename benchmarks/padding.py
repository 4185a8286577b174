"""How much length bucketing could save: the padding of random contrastive batches against batches bucketed by
length inside shuffled pools (sort a pool of N batches' pairs by length, cut it into batches), on SciFact's real
(query, relevant abstract) pairs. No model runs; it counts tokens.

    python benchmarks/padding.py --pools 1,4,8,32

Reported per pool size: padding as a share of the padded layout's tokens (what the projections and feed-forward
pay for) and attention's padded L^2 over the real tokens' L^2. Queries and passages are padded separately, as in a
training step, to a multiple of 8 as bge pads; a pool is sorted by passage length (the longer side), then by
query length.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import padding_costs, print_table, write_json
from benchmarks.train import scifact_pairs
from bge.hub import resolve_model
from bge.weights import load_model


def bucketed(pairs: list[tuple[list[int], list[int]]], batch_size: int, pool: int, seed: int) -> list[dict]:
    """Batches cut from length-sorted pools of `pool` batches, in shuffled order (pool 1 = random batches)."""
    out = []
    for lo in range(0, len(pairs) - batch_size + 1, batch_size * pool):
        chunk = pairs[lo : lo + batch_size * pool]
        if pool > 1:
            chunk = sorted(chunk, key=lambda qp: (len(qp[1]), len(qp[0])))
        out += [{"q": [q for q, _ in chunk[i : i + batch_size]], "p": [p for _, p in chunk[i : i + batch_size]]}
                for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    random.Random(seed).shuffle(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--max-passage-length", type=int, default=256)
    p.add_argument("--pools", default="1,4,8,32", help="batches per sorted pool (1 = no bucketing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    _, tokenizer = load_model(resolve_model(a.model))
    texts, _ = scifact_pairs(random.Random(a.seed))  # every pair once, shuffled as benchmarks/train.py does
    pairs = list(zip(tokenizer.tokenize([q for q, _ in texts], max_length=a.max_query_length),
                     tokenizer.tokenize([p for _, p in texts], max_length=a.max_passage_length)))
    at_cap = sum(len(pp) == a.max_passage_length for _, pp in pairs) / len(pairs)
    rows, summary = [], {"pairs": len(pairs), "passages_at_max_length": at_cap, "pools": {}}
    for pool in (int(x) for x in a.pools.split(",")):
        share, att = padding_costs(bucketed(pairs, a.batch_size, pool, a.seed))
        summary["pools"][pool] = {"padding_share": share, "attention_padded_over_real": att}
        rows.append(["random batches" if pool == 1 else f"bucketed, pools of {pool} batches", f"{100 * share:.1f}%",
                     f"{att:.3f}"])
    print_table(f"padding · SciFact train pairs ({len(pairs)}) · batch {a.batch_size} · max len "
                f"{a.max_query_length}/{a.max_passage_length} · {100 * at_cap:.0f}% of passages at the max length",
                ["batches", "padding share", "attention padded/real"], rows)
    write_json(a.json, summary)


if __name__ == "__main__":
    main()

