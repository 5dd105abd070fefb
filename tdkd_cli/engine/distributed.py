"""Devices and processes: which device a run uses, and the helpers a torchrun (DDP) run needs.

Single-process runs get a ``Dist`` with world 1, whose collective operations are no-ops, so the
training loop never branches on whether it runs distributed except where DDP itself is involved.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..core.errors import UsageError


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; 'cuda' only where CUDA is available."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False); use --device cpu")
        return device
    if device != "cpu":
        raise UsageError(f"--device must be cpu, cuda or auto (got {device!r})")
    return device


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world
        return t

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device: str) -> Dist:
    """The process group torchrun describes in $WORLD_SIZE/$RANK/$LOCAL_RANK (world 1 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    return Dist(world, rank, local)


def setup(device_spec: str) -> tuple[str, Dist]:
    """(device, Dist) of this process: under torchrun on CUDA each process takes its local GPU."""
    device = resolve_device(device_spec)
    dist = init_distributed(device)
    if dist.world > 1 and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(dist.local_rank)
    return device, dist


def all_reduce_grads(params: list[torch.Tensor], dist: Dist) -> None:
    """Average gradients across processes, once per optimizer step (all micro-batches and the
    cores' backward through the contraction are done by then), in one flat buffer."""
    if dist.world <= 1:
        return
    import torch.distributed as tdist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
    flat /= dist.world
    off = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[off:off + n].view_as(p.grad))
        off += n


def broadcast_best(best: dict, dist: Dist) -> dict:
    """Rank 0's best-so-far record ({metric, value, step}) on every process."""
    if dist.world <= 1:
        return best
    import torch.distributed as tdist

    t = torch.tensor([float("nan") if best["value"] is None else best["value"], -1 if best["step"] is None else best["step"]],
                     dtype=torch.float64)
    tdist.broadcast(t, src=0)
    if math.isnan(float(t[0])):
        return best
    return {"metric": best["metric"], "value": float(t[0]), "step": int(t[1])}


def gather_rng(dist: Dist) -> dict[str, torch.Tensor]:
    """Every process's RNG state as tensors (``rng.cpu.<rank>``, ``rng.cuda.<rank>``) for a checkpoint."""
    cpu = torch.get_rng_state()
    out = {}
    if dist.world > 1:
        import torch.distributed as tdist

        parts = [torch.empty_like(cpu) for _ in range(dist.world)]
        tdist.all_gather(parts, cpu)
        for i, s in enumerate(parts):
            out[f"rng.cpu.{i}"] = s
    else:
        out["rng.cpu.0"] = cpu
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[f"rng.cuda.{dist.rank}"] = torch.cuda.get_rng_state()
    return out
