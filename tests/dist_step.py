"""One training step of train.py's machinery, run by tests/test_distributed.py under torchrun (2 ranks, gloo)
and in a single process; rank 0 writes the global loss and the updated weights for the test to compare.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_step.py OUT_DIR MODEL_DIR [varlen]

With `varlen` the same steps run in the varlen layout (bge/packing.py, padded to a bucket), through DDP's wrapper.
"""
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors.torch import save_file

from bge.tasks import retrieval_loss
from bge import distributed, packing
from bge.batching import make_batch
from bge.config import TrainConfig
from bge.data import Example
from bge.step import forward_backward
from bge.weights import load_model

VARIANTS = [  # (name, queries in the global batch, group size, GradCache chunk, in-batch negatives)
    ("in-batch", 8, 1, 0, True),
    ("hard negatives", 8, 3, 0, True),
    ("hard negatives + gradcache", 8, 3, 5, True),
    ("uneven shards", 7, 3, 0, True),  # 3 queries on rank 0, 4 on rank 1: each rank's loss is weighted by its share
    ("own group only", 8, 3, 0, False),  # no in-batch negatives: a query finds its passages by their global owner
]


def examples() -> list[Example]:
    """8 queries; query 6 (on rank 1) brings query 0's positive (on rank 0) as a hard negative: a false
    negative for query 0 that only a mask over the gathered global batch can catch."""
    out = [Example(f"question {i} about {'spokes ' * i}wheels", [f"answer {i}: " + "true " * (2 + i)],
                   [f"distractor {i}.{k} " + "noise " * k for k in range(3)]) for i in range(8)]
    out[6].neg[0] = out[0].pos[0]
    return out


def main() -> None:
    out_dir, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    varlen = sys.argv[3:] == ["varlen"]
    info = distributed.init("cpu")
    ex = examples()
    results = {}
    for name, n, group, chunk, in_batch in VARIANTS:
        model, tok = load_model(model_dir)
        # float64 and dropout 0 (this model's config): one process and two must agree to rounding, ~1e-15, so that a
        # wrong weight or offset (an error of the size of float32 noise, 1e-7, included) cannot hide in a tolerance
        model.double().train()
        # plain SGD: Adam's first step is lr * g / (|g| + eps), which turns rounding in near-zero gradients into
        # visible weight differences; SGD moves the weights by exactly lr * gradient
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        net = distributed.wrap(model, info)
        fn = net or model.embed
        pack = functools.partial(packing.pack, pad_id=tok.pad_id, multiple=32, max_length=64)

        def embed(ids):  # make_embed's (the varlen layout: packed on the host), without its cast to float32
            if varlen:
                return fn(pack(ids).to(info.device))
            input_ids, mask = tok.pad(ids)
            return fn(input_ids, mask)

        batch = make_batch(ex, distributed.shard(list(range(n)), info), group_size=group, seed=0, epoch=0)
        inputs = {"q": tok.tokenize(batch.queries), "p": tok.tokenize(batch.passages)}
        cfg = TrainConfig(temperature=0.05, in_batch_negatives=in_batch)
        loss, stats = forward_backward(embed, inputs, lambda e: retrieval_loss(e, batch, cfg, info if net else None),
                                       chunk_size=chunk, device=info.device, no_sync=net.no_sync if net else None,
                                       together=varlen)
        grads = {f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        results[name] = distributed.mean(loss.item(), info)
        if info.main:
            save_file({**grads, **{k: v.contiguous() for k, v in model.state_dict().items()}}, str(out_dir / f"{name}.safetensors"))
    if info.main:
        (out_dir / "losses.json").write_text(json.dumps(results))
    distributed.shutdown(info)


if __name__ == "__main__":
    main()
