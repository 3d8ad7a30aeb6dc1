"""Data-parallel calibration over torch.distributed: shard the samples, all-reduce the statistics.

Launched by `torchrun --nproc_per_node N -m compress run ...`, every rank loads the whole model
and builds the same calibration windows; `init` checks that they are the same. Each rank then
takes the windows rank, rank + N, ... (`shard`), and every statistic summed over samples is
all-reduced before it is read, so every rank compresses with the same numbers and ends with the
same model: the single-process result up to floating-point summation order. gloo carries CPU
tensors and NCCL CUDA ones.

The statistics objects reduce themselves (`stats.all_reduce_stats_`, beside their fields' REDUCE
table); this module holds the process group. Where the reductions happen (each statistics object
exactly once, when every local sample has added to it and before anything reads it):

- calibrate.compress_block: a Linear's LinearStats right before `compress(fqn, stats)`, where all
  local samples have paused at that Linear. q/k/v (and gate/up) share one object, which is
  reduced for the first of them; the others find it reduced.
- calibrate.dense_pass: the input norms after each block, and the block influence sums.
- smooth.awq_smooth_block_ and structured.shrink_block_: the XᵀX they observe, before the scale
  search or the scores and least-squares refit read it (both are functions of XᵀX alone).
- phases.quantize_head_: the head's LinearStats.
- stats.collect_fisher: every FisherStats (diagonal and K-FAC sums, counts) at the end.
- evaluate.perplexity: the summed NLL and token count of each rank's share of the windows.

Every rank runs every collective in the same order because every rank has at least one sample
(`shard` refuses otherwise) and the block's Linears run in the model's fixed order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")

# rank 0 alone saves the model while the others wait at a barrier: NCCL's 10-minute default
# timeout is too short for writing a large checkpoint
TIMEOUT = timedelta(hours=2)

def world() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes output and prints (rank 0, or the only process)."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher that sets RANK and WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None) -> str | None:
    """Start the default process group when launched by torchrun; returns the device this rank
    computes on. `--device cuda` becomes cuda:LOCAL_RANK, one GPU per rank, and NCCL carries the
    CUDA tensors (gloo the CPU ones); without CUDA it is gloo alone. A no-op outside torchrun."""
    if not launched() or dist.is_initialized():
        return device
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        n = int(os.environ["WORLD_SIZE"])
        if torch.device(device).index is not None and n > 1:
            raise ValueError(f"--device {device} names one GPU for all {n} ranks; give --device cuda "
                             "and each rank takes cuda:LOCAL_RANK")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.device(device).index is None else device
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=TIMEOUT)
    return device


def barrier() -> None:
    """Wait until every rank is here (a no-op without a process group)."""
    if world() > 1:
        dist.barrier()


def finish() -> None:
    """End the process group, also after an error: a process that exits with gloo's threads still
    running aborts (SIGABRT) instead of returning its exit code. A no-op without one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T], what: str = "calibration windows") -> list[T]:
    """This rank's share: items rank, rank + world, ... . Raises ValueError when some rank would get
    none, because every rank must run the same collectives in the same order."""
    n = world()
    if n > 1 and len(items) < n:
        raise ValueError(f"{len(items)} {what} for {n} ranks: every rank needs at least one "
                         "(raise calib.samples or calib.score_samples, or use fewer processes)")
    return list(items[rank() :: n])


def check_same(tensors: Sequence[Tensor], what: str = "calibration windows") -> None:
    """Raise RuntimeError unless every rank holds the same tensors (compared by a hash)."""
    if world() == 1:
        return
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = torch.tensor([int.from_bytes(h.digest()[:7], "little")], dtype=torch.int64)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo.item() != hi.item():
        raise RuntimeError(f"the {what} differ between ranks; every rank must build the same ones "
                           "(same data, seed and settings) before they are sharded")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Python numbers summed over ranks (in float64)."""
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
