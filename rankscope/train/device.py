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


def shard_fsdp(model, dist: Dist, *, bf16: bool):
    """``model`` sharded in place over the processes with torch's FSDP2 ``fully_shard``.

    Each repeated block (every element of the model's longest ``nn.ModuleList``) is one unit,
    the root another, so one block's full parameters exist at a time. Parameters stay float32
    (the master weights AdamW updates); with ``bf16`` they are gathered in bf16 for compute,
    and gradients are reduced in float32. Gradients are averaged over processes, as DDP does.

    Returns:
        The same module, now an FSDP module whose parameters are DTensor shards.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                  reduce_dtype=torch.float32)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    for block in max(lists, key=len, default=[]):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def micro_batch_sync(model, dist: Dist, *, last: bool):
    """The context of one micro-batch's forward: gradients are reduced over the processes only
    after the last micro-batch of a step (DDP's ``no_sync``; FSDP's gradient-sync flag)."""
    if hasattr(model, "set_requires_gradient_sync"):       # FSDP: read by the backward
        model.set_requires_gradient_sync(last or dist.world == 1)
        return nullcontext()
    return nullcontext() if dist.world == 1 or last else model.no_sync()


def full_state(model) -> dict[str, torch.Tensor]:
    """The model's state dict with every FSDP shard gathered into its full tensor (a collective:
    every process calls it), on the CPU."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in model.state_dict().items()}


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
