"""The training loop every run shares: the batches, the optimizer and its schedule, and the steps.

Every run of a sweep sees the same batches in the same order (drawn from the seed), the same
schedule and the same number of tokens: only the method differs. ``recommend --validate``, the
learning-rate search and ``benchmarks/train.py`` step through the same ``train_steps``.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch

from rankscope.train.device import Dist, autocast, micro_batch_sync
from rankscope.train.objective import loss_sum, n_targets, trim_padding


class Step(NamedTuple):
    """One optimizer step taken: its number (from 1), mean loss and the rate it applied."""

    step: int
    loss: float
    lr: float


def lr_lambda(step: int, *, total: int, warmup: float, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then the decay."""
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    if schedule == "constant":
        return 1.0
    progress = (step - n_warm) / max(1, total - n_warm)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_order(n: int, *, steps: int, per_step: int, seed: int) -> torch.Tensor:
    """The example indices of every step, (steps, per_step): epochs of seeded permutations."""
    g = torch.Generator().manual_seed(seed)
    need = steps * per_step
    perms = [torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))]
    return torch.cat(perms)[:need].view(steps, per_step)


def make_optimizer(params, cfg, *, method: str):
    """AdamW at the method's peak rate and its warm-up + decay schedule.

    The fused AdamW, on the CPU as on CUDA: one pass over all parameters instead of a dozen
    elementwise ops per tensor (measured on 2 cores: 0.13 s against 1.1 s a step for the 35 M
    parameters of a 2-block SmolLM2 slice; the full 135 M model scales with it).

    Args:
        params: the parameters to train.
        cfg: the SweepConfig (lr_full, lr_lora, weight_decay, steps, warmup, schedule).
    Returns:
        (optimizer, LambdaLR scheduler).
    """
    lr = cfg.lr_full if method == "full" else cfg.lr_lora
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_lambda(
        s, total=cfg.steps, warmup=cfg.warmup, schedule=cfg.schedule))
    return opt, sched


def train_steps(model, task, order: torch.Tensor, *, cfg, dist: Dist, bf16: bool, opt, sched,
                start: int = 0) -> Iterator[Step]:
    """Take the optimizer steps ``start``, …, ``len(order) − 1``, yielding after each.

    Each step: gradients over the global batch ``order[step]`` (micro-batches of
    ``cfg.batch_size``, sharded over ``dist``'s processes), the summed loss divided once by
    the batch's target count, gradient clipping at ``cfg.clip``, then AdamW and the schedule.
    The caller does what it needs between steps (log, evaluate, checkpoint, time).

    Args:
        model: the model, its DDP wrapper or the model sharded by FSDP when ``dist.world``
            > 1; in train mode.
        task: the TaskData; its training tensors (``task.train``, with the planted task's
            teacher) and ``task.kind``.
        order: (steps, batch_size · grad_accum) example indices (``batch_order``).
        cfg: the SweepConfig; batch_size, grad_accum and clip are read.
        opt, sched: the optimizer over the model's trainable parameters and its scheduler.
        start: the first step, for a run resumed from a checkpoint.
    Yields:
        ``Step`` after each optimizer step.
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    for step in range(start, len(order)):
        loss = _gradients(model, task, order[step], cfg=cfg, dist=dist, bf16=bf16)
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        lr = sched.get_last_lr()[0]             # the rate this step applies, logged with it
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        yield Step(step + 1, loss, lr)


def _gradients(model, task, idx: torch.Tensor, *, cfg, dist: Dist, bf16: bool) -> float:
    """Accumulate one step's gradients over the global batch ``idx``; returns its mean loss."""
    n = n_targets(task.train, idx, kind=task.kind)
    # on the device: NCCL reduces only CUDA tensors, and the loss is read back once a step
    total = torch.zeros((), dtype=torch.float64, device=dist.device)
    micro = idx.view(cfg.grad_accum, cfg.batch_size)
    for a, mb in enumerate(micro):
        shard = mb[dist.rank::dist.world]
        batch = trim_padding({k: v[shard].to(dist.device) for k, v in task.train.items()})
        sync = micro_batch_sync(model, dist, last=a == cfg.grad_accum - 1)
        with sync, autocast(dist.device, bf16):
            loss, _ = loss_sum(model, batch, kind=task.kind, teacher=getattr(task.train, "teacher", None))
        # DDP averages gradients over processes: scale by world so the sum is global.
        (loss * dist.world / n).backward()
        total += loss.detach().double()
    if dist.world > 1:
        import torch.distributed as D

        D.all_reduce(total)
    return float(total) / n


def train_in_process(model, task, *, cfg, method: str, seed: int, device: torch.device,
                     bf16: bool, progress: bool = False, desc: str = "train") -> list[float]:
    """Train ``model``'s trainable parameters as the sweep trains a run of ``method``; the step
    losses. The sweep's optimizer and schedule, its batches (``batch_order`` from the seed)
    and its loop, in one process, with no checkpoint: for the short trainings of
    ``recommend --validate`` and the learning-rate search.
    """
    import sys

    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg, method=method)
    torch.manual_seed(seed)                 # dropout stream, as a sweep run seeds it
    order = batch_order(task.train["input_ids"].shape[0], steps=cfg.steps,
                        per_step=cfg.batch_size * cfg.grad_accum, seed=seed)
    model.train()
    steps = train_steps(model, task, order, cfg=cfg, dist=Dist(device=device), bf16=bf16,
                        opt=opt, sched=sched)
    return [s.loss for s in tqdm(steps, total=len(order), desc=desc, unit="step", leave=False,
                                 disable=not progress, file=sys.stderr)]
