"""Training throughput: bge's training step against sentence-transformers' (MultipleNegativesRankingLoss), same
model, same batches, same temperature, in one run; each configuration in a fresh process for a clean peak RSS.

    python benchmarks/train.py --vs sentence-transformers --variants fp32,bf16,bf16+packed+compile

Batches are SciFact train (query, relevant abstract) pairs with their real token lengths (or --lengths 24,128 for
fixed synthetic lengths), tokenised once up front for both sides: the step is what is timed. Reported per
configuration: samples/s and real (non-padding) tokens/s (median of --repeats processes, min-max), seconds per
step, peak memory (RSS on CPU, max allocated on CUDA), and model FLOP utilisation against this device's own
matmul peak measured in the same process. --check-loss compares the fp32 loss trajectories with dropout off.

Variants are `+`-joined switches: fp32 | bf16 | fp16, packed, varlen (the texts packed on the host, one forward per
step, FlashAttention over sequence offsets on CUDA: train.py's --packed --attention varlen), bucket=N (varlen padded
to a multiple of N tokens: few shapes, for CUDA graphs), compile, cudagraphs (compile with CUDA graphs: mode
"reduce-overhead"), gradcache=N (GradCache chunks of N texts; 0 = off; without it, train.py's default: chunks of 32
on CPU for steps of over 24,576 padded tokens), ckpt (gradient checkpointing), adrop=P (attention dropout P instead
of the model's; either side), malloc=keep | system (either side: bge/malloc.py's settings, which bge's side has by
default as train.py does, or glibc's own, sentence-transformers' default). sentence-transformers variants take fp32
| bf16, adrop=P, malloc=..., and cached=N (CachedMultipleNegativesRankingLoss, its GradCache, mini-batches of N). A
configuration that fails (out of memory, say) is reported and the others still run. --profile adds, per
configuration, how busy the device was over two profiled steps (on CUDA: kernel time / wall time; low = the step
waits on Python and kernel launches, not on arithmetic) and the operators that took most of it. --check-variants
compares bge variants' loss trajectories with dropout off (the varlen path against the padded one, say), each
against the first.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import SCIFACT, padding_costs, print_table, write_json
from bge.console import console
from bge.hub import resolve_model
from bge.malloc import keep_freed_memory


# ---- the batches ---------------------------------------------------------------------------------------
def scifact_pairs(rng: random.Random) -> tuple[list[tuple[str, str]], list[str]]:
    """SciFact's train (query, relevant abstract) text pairs in rng's shuffled order, and every abstract."""
    corpus = {}
    for line in open(SCIFACT / "corpus.jsonl", encoding="utf-8"):
        d = json.loads(line)
        corpus[d["_id"]] = (d.get("title", "") + " " + d["text"]).strip()
    queries = {json.loads(l)["_id"]: json.loads(l)["text"] for l in open(SCIFACT / "queries.jsonl", encoding="utf-8")}
    pairs = [l.split("\t")[:2] for l in open(SCIFACT / "qrels" / "train.tsv").read().splitlines()[1:]]
    pairs = [(queries[q], corpus[d]) for q, d in pairs]
    rng.shuffle(pairs)
    return pairs, list(corpus.values())


def make_batches(tokenizer, a) -> list[dict[str, list[list[int]]]]:
    """Deterministic batches of token ids: {"q": B queries, "p": B*group passages (positive first per query)}."""
    rng = random.Random(a.seed)
    if a.lengths == "scifact":
        pairs, docs = scifact_pairs(rng)
        q_ids = tokenizer.tokenize([q for q, _ in pairs], max_length=a.max_query_length)
        p_ids = tokenizer.tokenize([p for _, p in pairs], max_length=a.max_passage_length)
        n_ids = tokenizer.tokenize(rng.sample(docs, min(len(docs), len(pairs) * (a.group_size - 1) or 1)),
                                   max_length=a.max_passage_length)
    else:  # fixed synthetic lengths "q,p": random ids between [CLS] and [SEP]
        ql, pl = lengths_of(a)
        n = a.batch_size * (a.steps + a.warmup)
        rand = lambda L: [101] + [rng.randrange(1000, 29000) for _ in range(L - 2)] + [102]
        q_ids, p_ids, n_ids = [rand(ql) for _ in range(n)], [rand(pl) for _ in range(n)], [rand(pl) for _ in range(n * a.group_size)]
    batches, ni = [], 0
    for s in range(a.steps + a.warmup):
        # a batch larger than SciFact's 919 training pairs takes some twice (throughput, not quality, is measured)
        lo = (s * a.batch_size) % (len(q_ids) - a.batch_size) if len(q_ids) > a.batch_size else 0
        q, p = [], []
        for i in (j % len(q_ids) for j in range(lo, lo + a.batch_size)):
            q.append(q_ids[i])
            p.append(p_ids[i])
            for _ in range(a.group_size - 1):
                p.append(n_ids[ni % len(n_ids)])
                ni += 1
        batches.append({"q": q, "p": p})
    return batches


def lengths_of(a) -> list[int]:
    """The fixed synthetic lengths of --lengths q,p (none for scifact)."""
    return [] if a.lengths == "scifact" else [int(x) for x in a.lengths.split(",")]


def train_flops(n_linear_params: int, hidden: int, layers: int, batch: dict) -> float:
    """Forward + backward FLOPs on the real tokens: 3 x (2 x linear params x tokens + 4 x hidden x L^2 per layer)."""
    lengths = [len(x) for ids in batch.values() for x in ids]
    return 3 * (2 * n_linear_params * sum(lengths) + 4 * hidden * layers * sum(L * L for L in lengths))


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 0) -> float:
    """FLOP/s of a large square matmul in this dtype on this device: the denominator of MFU. The fastest of three
    timed rounds, each timing both layouts, a @ b and F.linear's a @ b.T: on a CPU without native bf16 (AMD EPYC with
    AVX2 only) a bf16 a @ b ran at 0.7 GFLOP/s and the model's F.linear at 8, and one round that a busy machine slowed
    would understate the peak too; either way MFU would pass 100%."""
    n = n or (1024 if device.type == "cpu" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    products = (lambda: a @ b, lambda: torch.nn.functional.linear(a, b))
    reps = 2 if device.type == "cpu" else 20
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for product in products:
        product()  # warm-up
    for _ in range(3):
        for product in products:
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                product()
            sync()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


# ---- one configuration, in its own process --------------------------------------------------------------
def worker(a) -> dict:
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    switches = set(a.variant.split("+"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(next((s for s in switches if s in ("bf16", "fp16")), ""), None)
    value = lambda key, cast, default: next((cast(s.split("=")[1]) for s in switches if s.startswith(key + "=")),
                                            default)
    gradcache, bucket, cached = value("gradcache", int, -1), value("bucket", int, 0), value("cached", int, 0)
    adrop = value("adrop", float, None)
    # bge's train.py keeps freed memory in the process (bge/malloc.py); sentence-transformers runs on glibc's defaults.
    # malloc=system or malloc=keep sets either side either way, for the like-for-like ratio.
    if value("malloc", str, "keep" if a.side == "bge" else "system") == "keep":
        keep_freed_memory()
    folder = resolve_model(a.model)
    from bge.weights import load_model
    model, tokenizer = load_model(folder)
    batches = make_batches(tokenizer, a)
    peak = matmul_peak(device, dtype or torch.float32)

    if a.side == "bge":
        from bge import packing
        from bge.config import grad_cache_chunk
        from bge.loss import info_nce
        from bge.optim import make_optimizer
        from bge.step import forward_backward, make_embed
        if a.no_dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            model.cfg.attention_dropout = 0.0
        if adrop is not None and not a.no_dropout:
            model.cfg.attention_dropout = adrop
        model.to(device).train()
        model.grad_checkpointing = "ckpt" in switches
        n_linear = sum(p.numel() for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2)
        hidden, layers = model.cfg.hidden_size, model.cfg.num_layers
        opt = make_optimizer(model, lr=a.lr, weight_decay=0.01, fused=device.type in ("cpu", "cuda"))
        graphs, varlen = "cudagraphs" in switches, "varlen" in switches
        longest = min(max(a.max_query_length, a.max_passage_length, *lengths_of(a)), tokenizer.position_limit)
        pack = functools.partial(packing.pack, pad_id=tokenizer.pad_id, multiple=bucket, max_length=longest)
        embed = make_embed(model.embed, tokenizer.pad, device, amp_dtype=dtype, compile=graphs or "compile" in switches,
                           compile_mode="reduce-overhead" if graphs else "default", packed="packed" in switches,
                           pack=pack if varlen else None)
        labels = torch.arange(a.batch_size, device=device) * a.group_size

        def step(batch):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            chunk = grad_cache_chunk(gradcache, device.type, batch, fp32=dtype is None)  # as train.py picks it
            loss, _ = forward_backward(embed, batch, lambda e: (info_nce(e["q"], e["p"], labels, a.temperature)[0], {}),
                                       chunk_size=chunk, device=device, together=varlen)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()
    else:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
        st = SentenceTransformer(str(folder), device=str(device))
        if a.no_dropout:
            for m in st.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            st[0].auto_model.config.attention_probs_dropout_prob = 0.0
        elif adrop is not None:  # HF BERT reads its attention dropout rate from each self-attention's Dropout module
            for name, m in st.named_modules():
                if isinstance(m, torch.nn.Dropout) and ".attention.self." in name + ".":
                    m.p = adrop
        st.train()
        bert = st[0].auto_model
        n_linear = sum(p.numel() for n, p in bert.named_parameters() if ".layer." in n and p.ndim == 2)
        hidden, layers = bert.config.hidden_size, bert.config.num_hidden_layers
        if cached:
            loss_model = CachedMultipleNegativesRankingLoss(st, scale=1.0 / a.temperature, mini_batch_size=cached)
            if dtype is not None:  # its re-forward runs inside backward, on CUDA in a thread without our autocast
                bert.forward = torch.autocast(device.type, dtype=dtype)(bert.forward)
        else:
            loss_model = MultipleNegativesRankingLoss(st, scale=1.0 / a.temperature)
        decay = [p for p in st.parameters() if p.ndim >= 2]
        no_decay = [p for p in st.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=a.lr, fused=device.type in ("cpu", "cuda"))

        def features(ids):
            input_ids, mask = tokenizer.pad(ids)
            return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                    "token_type_ids": torch.zeros_like(input_ids).to(device)}

        def step(batch):
            # MNRL's layout: anchors, then each column of candidates (positives, then each negative)
            g = a.group_size
            cols = [batch["p"][k::g] for k in range(g)]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = loss_model([features(batch["q"])] + [features(c) for c in cols], labels=None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step(batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    timed = batches[a.warmup:]
    tokens = sum(len(x) for b in timed for ids in b.values() for x in ids)
    flops = sum(train_flops(n_linear, hidden, layers, b) for b in timed)
    seconds = sum(times)
    memory = (torch.cuda.max_memory_allocated() if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"samples_per_s": a.batch_size * len(timed) / seconds, "tokens_per_s": tokens / seconds,
              "s_per_step": statistics.median(times), "peak_memory_gb": memory / 1e9, "mfu": flops / seconds / peak,
              "matmul_peak_tflops": peak / 1e12, "losses": losses}
    if a.profile:
        try:  # a diagnosis, never a reason to lose the throughput figures above
            result["profile"] = profile(step, timed[:2], device)
        except Exception as e:
            result["profile"] = {"error": f"{type(e).__name__}: {e}"}
    return result


def profile(step, batches: list, device: torch.device, top: int = 8) -> dict:
    """Run `batches` under torch.profiler: the device's busy share of the wall time (on CUDA, summed kernel and copy
    time / wall; None on CPU, where the operators are the wall time), the operators with the most self time on the
    device (CUDA) or CPU, and on CUDA the kernels with the most time. The profiler slows the host side, so the busy
    share is a lower bound for the unprofiled step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for batch in batches:
            step(batch)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    # an operator's self device time is the kernels it launched, so operators and kernels are ranked apart: summed
    # together they would count each kernel twice
    ops = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ms = lambda evs: [[e.key[:80], key(e) / 1e3 / len(batches)] for e in sorted(evs, key=key, reverse=True)[:top]]
    matmuls = sum(key(e) for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e3 / len(batches)
    return {"wall_s_per_step": wall / len(batches), "matmul_ms": matmuls,  # the model's share, wherever it ranks
            "device_busy": sum(k.self_device_time_total for k in kernels) / 1e6 / wall if cuda else None,
            "top": ms(ops), "kernels": ms(kernels) if cuda else []}  # ms per step


# ---- the orchestrator ------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--group-size", type=int, default=1, help="passages per query (1 = pairs, in-batch negatives)")
    p.add_argument("--max-query-length", type=int, default=64)
    p.add_argument("--max-passage-length", type=int, default=256)
    p.add_argument("--lengths", default="scifact", help="'scifact' (real lengths) or fixed 'query,passage' tokens")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3, help="processes per configuration")
    p.add_argument("--variants", default="fp32,bf16", help="comma-separated bge variants, e.g. bf16+packed+compile")
    p.add_argument("--vs", choices=["sentence-transformers"], default=None)
    p.add_argument("--vs-variants", default="fp32", help="sentence-transformers variants (fp32, bf16)")
    p.add_argument("--check-loss", action="store_true", help="also compare fp32 loss trajectories, dropout off")
    p.add_argument("--check-variants", default="", help="bge variants whose loss trajectories (dropout off) are "
                   "compared with the first's, e.g. bf16,bf16+varlen")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", action="store_true", help="profile two more steps per configuration (device busy "
                   "share, top operators)")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--side", default="bge", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--no-dropout", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    def run(side: str, variant: str, no_dropout: bool = False) -> dict:
        argv = [sys.executable, __file__, "--worker", "--side", side, "--variant", variant]
        for k in ("model", "batch_size", "group_size", "max_query_length", "max_passage_length", "lengths", "steps",
                  "warmup", "temperature", "lr", "seed", "device"):
            argv += ["--" + k.replace("_", "-"), str(getattr(a, k))]
        argv += (["--no-dropout"] if no_dropout else []) + (["--profile"] if a.profile and not no_dropout else [])
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:  # reported, and the other configurations still run (one shot on a lent GPU)
            error = (out.stderr.strip().splitlines() or ["no output"])[-1][:300]
            console.print(f"[red]{side} {variant} failed[/]: {error}")
            return {"error": error}
        return json.loads(out.stdout.strip().splitlines()[-1])

    # the reference (sentence-transformers' first variant) first: a run cut short still has something to compare to
    configs = ([("st", v) for v in a.vs_variants.split(",")] if a.vs else []) + [("bge", v) for v in a.variants.split(",")]
    results: dict[str, list[dict]] = {f"{s} {v}": [] for s, v in configs}
    failed: dict[str, str] = {}
    summary = {"args": {k: v for k, v in vars(a).items() if k not in ("worker", "side", "variant", "no_dropout")},
               "results": results, "failed": failed}
    for _ in range(a.repeats):  # interleaved, so drifting machine load hits every configuration alike
        for side, variant in configs:
            r = run(side, variant)
            if "error" in r:
                failed.setdefault(f"{side} {variant}", r["error"])
                continue
            results[f"{side} {variant}"].append(r)
            busy = (r.get("profile") or {}).get("device_busy")
            console.print(f"{side} {variant}: {r['samples_per_s']:.1f} samples/s, {r['s_per_step']:.3f} s/step, "
                          f"MFU {100 * r['mfu']:.1f}%" + (f", device busy {100 * busy:.0f}%" if busy else ""))
            write_json(a.json, summary)  # after every process, so a run cut short keeps what it measured

    def med(name, key):
        return statistics.median(r[key] for r in results[name])

    def span(name, key, fmt):
        vals = sorted(r[key] for r in results[name])
        return f"{fmt.format(statistics.median(vals))} ({fmt.format(vals[0])}–{fmt.format(vals[-1])})"

    ref = f"st {a.vs_variants.split(',')[0]}" if a.vs else None
    ref = ref if ref and results.get(ref) else None
    rows = []
    show_busy = a.profile and a.device.startswith("cuda")  # the CPU profile has no device time
    for name in results:
        if not results[name]:
            rows.append([name.replace("st ", "sentence-transformers "), f"failed: {failed.get(name, '')[:60]}"]
                        + [""] * (5 + show_busy))
            continue
        ratio = f"{med(name, 'samples_per_s') / med(ref, 'samples_per_s'):.2f}x" if ref else ""
        rows.append([name.replace("st ", "sentence-transformers "), span(name, "samples_per_s", "{:.1f}"),
                     span(name, "tokens_per_s", "{:,.0f}"), f"{med(name, 's_per_step'):.2f}",
                     f"{med(name, 'peak_memory_gb'):.2f}", f"{100 * med(name, 'mfu'):.1f}%", ratio])
        busy = [b for r in results[name] if (b := (r.get("profile") or {}).get("device_busy")) is not None]
        if show_busy:
            rows[-1].append(f"{100 * statistics.median(busy):.0f}%" if busy else "n/a")
    if a.check_loss and a.vs:
        ours, theirs = run("bge", "fp32", no_dropout=True)["losses"], run("st", "fp32", no_dropout=True)["losses"]
        diff = max(abs(x - y) for x, y in zip(ours, theirs))
        summary["loss_check"] = {"bge": ours, "sentence-transformers": theirs, "max_abs_diff": diff}
        print(f"fp32 loss trajectories, dropout off, {len(ours)} steps: max |bge - sentence-transformers| = {diff:.2e}")
    if a.check_variants:
        runs = {v: run("bge", v, no_dropout=True) for v in a.check_variants.split(",")}
        first = next(iter(runs))
        check = summary["trajectory_check"] = {v: {"losses": r.get("losses"), "error": r.get("error")}
                                               for v, r in runs.items()}
        for v, r in runs.items():
            if v != first and "losses" in r and "losses" in runs[first]:
                check[v]["max_abs_diff"] = max(abs(x - y) for x, y in zip(r["losses"], runs[first]["losses"]))
                print(f"loss trajectory, dropout off, {len(r['losses'])} steps: max |{v} - {first}| = "
                      f"{check[v]['max_abs_diff']:.2e}")
    from bge.weights import load_model
    batches = make_batches(load_model(resolve_model(a.model))[1], a)
    summary["padding_share"] = padding_costs(batches)[0]  # of the padded layout's tokens; the packed layout has none
    print_table(f"training step · {Path(str(resolve_model(a.model))).name} · batch {a.batch_size} x group "
                f"{a.group_size} · max len {a.max_query_length}/{a.max_passage_length} · lengths {a.lengths} · "
                f"padding {100 * summary['padding_share']:.0f}% of padded tokens",
                ["", "samples/s", "real tokens/s", "s/step", "peak GB", "MFU", "vs ST"]
                + (["device busy"] if show_busy else []), rows)
    write_json(a.json, summary)


if __name__ == "__main__":
    main()
