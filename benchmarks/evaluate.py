"""Full retrieval evaluation, bge's evaluate_retrieval against sentence-transformers' InformationRetrievalEvaluator,
and STS-B dev against its EmbeddingSimilarityEvaluator: the same model folder, data, batch size and max length.

    python benchmarks/evaluate.py                      # SciFact train queries (809) over the whole corpus (5,183)
    python benchmarks/evaluate.py --json checkpoints/bench/evaluate.json

bge runs twice, with an empty embedding cache and then with the cache it wrote (warm: no passage is encoded).
Wall times cover the evaluation calls only, not loading models or reading files.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bge import Embedder
from bge.data import load_beir, load_sts
from bge.evaluation import evaluate_retrieval, evaluate_sts
from bge.hub import resolve_model
from benchmarks.common import SCIFACT, print_table, write_json

STSB_DEV = SCIFACT.parent / "stsb" / "sts-dev.tsv"
METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100", "precision@10")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--data", default=str(SCIFACT), help="BEIR folder")
    p.add_argument("--split", default="train")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast on CPU for bge")
    p.add_argument("--no-sts", action="store_true", help="skip the STS-B dev comparison")
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args()

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import (EmbeddingSimilarityEvaluator,
                                                                       InformationRetrievalEvaluator)

    folder = resolve_model(a.model)
    ours = Embedder.load(str(folder))
    st = SentenceTransformer(str(folder), device=str(ours.device))
    st.max_seq_length = a.max_length
    data = load_beir(a.data, a.split)
    relevant = {q: {d for d, g in r.items() if g > 0} for q, r in data.qrels.items()}
    n_deep = sum(len(r) > 100 for r in relevant.values())  # where sentence-transformers' MAP@100 differs from trec_eval's
    kw = dict(batch_size=a.batch_size, max_length=a.max_length, cpu_bf16=a.cpu_bf16)

    with tempfile.TemporaryDirectory() as cache:
        cold, t_cold = timed(lambda: evaluate_retrieval(ours, data, ks=(10, 100), cache_dir=cache, **kw))
        warm, t_warm = timed(lambda: evaluate_retrieval(ours, data, ks=(10, 100), cache_dir=cache, **kw))
    assert warm.ranking.n_encoded == 0 and warm.metrics.summary == cold.metrics.summary
    evaluator = InformationRetrievalEvaluator(data.queries, data.corpus, relevant, batch_size=a.batch_size,
                                              mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[10],
                                              precision_recall_at_k=[10, 100], map_at_k=[100], write_csv=False)
    theirs, t_st = timed(lambda: evaluator(st))
    theirs = {m: theirs[f"cosine_{m}"] for m in METRICS}

    ir_rows = [[m, f"{cold.metrics.summary[m]:.4f}", f"{theirs[m]:.4f}",
                f"{abs(cold.metrics.summary[m] - theirs[m]):.1e}"] for m in METRICS]
    ir_rows += [["wall time, cold cache (s)", f"{t_cold:.1f}", f"{t_st:.1f}", ""],
                ["wall time, warm cache (s)", f"{t_warm:.1f}", "", ""]]
    print_table(f"{data.name}: {len(data.queries)} queries, {len(data.corpus):,} passages · {a.model} · "
                f"batch {a.batch_size} · max length {a.max_length}{' · bf16' if a.cpu_bf16 else ''}",
                ["", "bge", "sentence-transformers", "|diff|"], ir_rows)
    seconds = {"bge_cold": t_cold, "bge_warm": t_warm, "sentence_transformers": t_st,
               "bge_cold_parts": cold.ranking.seconds, "bge_warm_parts": warm.ranking.seconds}
    payload = {"args": vars(a), "queries": len(data.queries), "passages": len(data.corpus),
               "queries_with_more_than_100_relevant": n_deep, "bge": {m: cold.metrics.summary[m] for m in METRICS},
               "sentence_transformers": theirs, "seconds": seconds}

    if not a.no_sts:
        sts = load_sts(STSB_DEV)
        ours_sts, t_ours = timed(lambda: evaluate_sts(ours, sts, **kw))
        st_eval = EmbeddingSimilarityEvaluator(sts.sentence1, sts.sentence2, sts.scores, batch_size=a.batch_size,
                                               similarity_fn_names=["cosine"], write_csv=False)
        theirs_sts, t_theirs = timed(lambda: st_eval(st))
        rows = [[m, f"{ours_sts[m]:.4f}", f"{theirs_sts[f'{m}_cosine']:.4f}",
                 f"{abs(ours_sts[m] - theirs_sts[f'{m}_cosine']):.1e}"] for m in ("spearman", "pearson")]
        rows.append(["wall time (s)", f"{t_ours:.1f}", f"{t_theirs:.1f}", ""])
        print_table(f"STS-B dev: {len(sts.scores):,} pairs · cosine · {a.model}",
                    ["", "bge", "sentence-transformers", "|diff|"], rows)
        payload["sts"] = {"bge": {m: ours_sts[m] for m in ("spearman", "pearson")},
                          "sentence_transformers": {m: theirs_sts[f"{m}_cosine"] for m in ("spearman", "pearson")},
                          "seconds": {"bge": t_ours, "sentence_transformers": t_theirs}}
    write_json(a.json, payload)


if __name__ == "__main__":
    main()
