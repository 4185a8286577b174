"""Data parallelism with torch.distributed (torchrun): process group, DDP wrapper, cross-device negatives.

Launch:  torchrun --nproc_per_node N train.py ...   (NCCL on CUDA, gloo on CPU). `--batch-size` is per device.

Cross-device negatives, and why the gradients are right: every rank all-gathers the passage (and query)
embeddings with an autograd-aware all_gather, whose backward reduce-scatters (sums) the gradients of the
gathered copies back to the rank that owns them. Rank r's loss is the mean over its queries against all
passages; DDP then averages the parameter gradients over ranks. Together:
    (1/W) sum_r dL_r/dtheta  =  d/dtheta [ mean over all W*B queries ]
which is the single-process gradient on the concatenated global batch. No 1/W or W fudge factor is needed
(the usual bugs: gathering without autograd and keeping only the local slice's gradient loses the other
ranks' terms; scaling the loss by W on top of DDP's average double-counts).
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad
from torch.nn.parallel import DistributedDataParallel as DDP

from bge.checkpoint import rng_state


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> DistInfo:
    """One process per device under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return DistInfo(device=torch.device(device))
    local = int(os.environ["LOCAL_RANK"])
    dev = torch.device(f"cuda:{local}") if device.startswith("cuda") else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # validation runs on rank 0 while the others wait at a barrier: allow it hours, not the default minutes
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6))
    return DistInfo(dist.get_rank(), dist.get_world_size(), dev)


def broadcast(obj, info: DistInfo):
    """Rank 0's value of obj, on every rank (a run name with a timestamp, an early-stop decision)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group, once every rank is here and gloo's worker thread has dropped its finished work:
    torch (2.13) joins that thread while holding the GIL, and the thread needs the GIL to free a finished collective's
    tensors, so a rank could hang at exit (seen in tests/dist_step.py)."""
    if info.enabled:
        dist.barrier()
        time.sleep(0.05)  # releases the GIL to the worker thread
        dist.destroy_process_group()


class EmbedModule(nn.Module):
    """The encoder with `embed` as its forward, so DDP's gradient hooks see the calls training makes."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
        return self.encoder.embed(input_ids, attention_mask, packed=packed)  # input_ids may be a Packed batch


def wrap(model: nn.Module, info: DistInfo) -> DDP | None:
    """DDP around the encoder's embed, or None in a single process. Every DDP forward is followed by its own
    backward (bge.step.forward_backward sees to it), and no_sync holds the all-reduce back until the last."""
    if not info.enabled:
        return None
    return DDP(EmbedModule(model), device_ids=[info.device] if info.device.type == "cuda" else None)


def shard(indices: list[int], info: DistInfo) -> list[int]:
    """This rank's contiguous share of a global batch (sizes differ by at most one), so the ranks' shares
    concatenated in rank order are the global batch a single process would see."""
    n, w, r = len(indices), info.world, info.rank
    return indices[r * n // w : (r + 1) * n // w]


def gather(x: torch.Tensor, info: DistInfo, grad: bool) -> tuple[torch.Tensor, int]:
    """Concatenate x (n_r, ...) from every rank in rank order; (global tensor, offset of this rank's rows).
    Ranks may hold different n_r: rows are padded to the largest for the collective and stripped after."""
    if not info.enabled:
        return x, 0
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(info.world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros(max(sizes) - len(x), *x.shape[1:])]) if len(x) < max(sizes) else x
    if grad:
        parts = all_gather_with_grad(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(info.world)]
        dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[: info.rank])


def cross_device_batch(q: torch.Tensor, p: torch.Tensor, batch, info: DistInfo) -> tuple:
    """The global view of a sharded contrastive batch, for this rank's queries: all passages (autograd-aware),
    and in global numbering each local query's positive, each passage's owner and text hash; plus this rank's
    first global query index and the weight that makes DDP's average the mean over all global queries."""
    p_all, p_offset = gather(p, info, grad=True)
    counts, _ = gather(torch.tensor([len(q)], device=q.device), info, grad=False)  # queries per rank
    q_offset, n_all = int(counts[: info.rank].sum()), int(counts.sum())  # (gather's own offset counts rows: 1 a rank)
    owner, _ = gather(batch.owner.to(q.device) + q_offset, info, grad=False)
    hashes, _ = gather(batch.passage_hashes.to(q.device), info, grad=False)
    return p_all, batch.pos_index.to(q.device) + p_offset, owner, hashes, q_offset, len(q) * info.world / n_all


def all_true(flag: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """A 0-d bool tensor, True on every rank only if it is true on every rank (skip a step together, never alone);
    computed on the device, so the host does not wait for it."""
    if not info.enabled:
        return flag
    t = flag.to(torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def all_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The element-wise mean of a tensor over ranks (the logged loss and accuracy), on the device."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / info.world


def mean(value: float, info: DistInfo) -> float:
    """Mean of a number over ranks (for logging the global loss and accuracy)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return float(t) / info.world


def rng_states(info: DistInfo) -> list[dict[str, torch.Tensor]]:
    """Every rank's RNG states (dropout masks differ per rank), in rank order, on every rank."""
    state = rng_state()
    if not info.enabled:
        return [state]
    out = [None] * info.world
    dist.all_gather_object(out, {k: v.cpu() for k, v in state.items()})
    return out
