"""Where a run trains: the process's place in a data-parallel group, bf16 autocast, peak memory.

Under ``torchrun`` the processes form one group (gloo on the CPU, NCCL on CUDA); launched
plainly, a run is one process on one device.
"""
from __future__ import annotations

import os
import resource
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from rankscope.errors import InputError

FORCE_BF16_ENV = "RANKSCOPE_FORCE_BF16"     # 1/0: use_bf16's default, whatever the chip


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) data-parallel group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and logs (rank 0)."""
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun, else a single process.

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda".
    Returns:
        This process's Dist; on CUDA, TF32 is allowed for the float32 matmuls.
    Raises:
        InputError: "cuda" asked for where no CUDA device is available.
    """
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for but no CUDA device is available")
    if want_cuda:       # TF32 tensor cores for the float32 matmuls outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    dev = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def leave_dist() -> None:
    """Leave the torchrun process group, once every process has finished its runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model, dist: Dist):
    """``model`` in DistributedDataParallel when there are several processes, else itself."""
    if dist.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def use_bf16(setting: bool | None, device: torch.device) -> bool:
    """Whether to train under bf16 autocast: as set, else on CUDA and on CPUs with native bf16.

    A CPU without AVX-512 BF16 or AMX has no fast bf16 matmul: oneDNN is skipped and torch falls
    back to a reference GEMM loop, measured at ~100× slower than float32 on a 2-core AMD EPYC.

    The environment variable ``RANKSCOPE_FORCE_BF16`` (``1`` or ``0``) replaces the chip's answer
    when ``setting`` is None, on any device: it exists so that the test suite can be run once as
    a chip with native bf16 would run it and once as one without. An explicit setting wins.

    Args:
        setting: the configured ``bf16`` (True, False, or None for the default).
        device: where the run trains.
    Returns:
        True to train and evaluate under bf16 autocast.
    Raises:
        InputError: ``RANKSCOPE_FORCE_BF16`` is set to something other than 1, 0 or empty.
    """
    if setting is not None:
        return setting
    forced = os.environ.get(FORCE_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise InputError(f"{FORCE_BF16_ENV} must be 1 or 0, got {forced!r}")
        return forced == "1"
    if device.type == "cuda":
        return True
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on float32 weights (never bf16 weights: small updates would round away)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the CPU resident-set peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
