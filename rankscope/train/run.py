"""One run: full fine-tuning or LoRA (through peft) of one grid cell, resumable and deterministic.

Under ``torchrun`` the global batch is split across processes (DDP; gloo on CPU, nccl on
CUDA) and the loss is normalised by the global target count, so N processes compute the update
of one. With ``strategy: fsdp`` a full run's parameters, gradients and AdamW state are sharded
over the processes instead (FSDP2), and gathered into the whole model to save ΔW. A run
resumes from its folder's checkpoint, and a resumed run ends bit-identical to an uninterrupted
one; a sharded run keeps no checkpoint and restarts from its first step.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from rankscope.store.atomic import atomic_dir, atomic_write_text
from rankscope.store.provenance import provenance
from rankscope.store.runs import LABELS, OTHERS, UPDATES, RunId, label_file, snapshot_path, \
    write_manifest, write_updates
from rankscope.train.config import SweepConfig
from rankscope.train.data import TaskData
from rankscope.train.device import Dist, full_state, peak_memory_mb, shard_fsdp, use_bf16, \
    wrap_ddp
from rankscope.train.evaluation import evaluate
from rankscope.train.evidence import a_moved, delta_fro, eval_history, late_gain_share, \
    late_step, late_train_rise
from rankscope.train.loop import batch_order, make_optimizer, train_steps
from rankscope.train.model_setup import build_model, trainable
from rankscope.train.models import resolve_model
from rankscope.train.objective import tokens_in
from rankscope.train.run_folder import clear_checkpoint, load_checkpoint, save_checkpoint
from rankscope.train.updates import full_updates, lora_a, lora_updates


@dataclass(frozen=True, eq=False)
class RunPlan:
    """Everything fixed about one run while it trains: what, on which data, where, how."""

    cfg: SweepConfig
    task: TaskData
    run: RunId
    run_dir: Path
    dist: Dist
    bf16: bool

    @property
    def sharded(self) -> bool:
        """Whether this run trains sharded by FSDP: a full run, ``strategy: fsdp``, ≥ 2
        processes (LoRA's few trainable parameters stay with DDP)."""
        return self.cfg.strategy == "fsdp" and self.dist.world > 1 and self.run.method == "full"

    @cached_property
    def snapshot_steps(self) -> frozenset[int]:
        """The steps whose update this run saves under ``snapshots/`` (none when sharded:
        only the gathered model has the whole ΔW)."""
        return frozenset() if self.sharded else frozenset(self.cfg.snapshot_steps())

    @cached_property
    def late(self) -> int:
        """The step of the held-out evaluation that splits off the last fifth of the rate's
        mass (``evidence.late_step``)."""
        return late_step(self.cfg.steps, warmup=self.cfg.warmup, schedule=self.cfg.schedule)


def train_run(cfg: SweepConfig, task: TaskData, run_dir: Path, run: RunId, *, dist: Dist,
              base_eval: dict | None = None, base_examples: dict | None = None,
              progress: bool = True) -> dict:
    """Train one run into ``run_dir`` (resuming from its checkpoint) and return its manifest.

    Args:
        cfg: the sweep's SweepConfig; task: its TaskData; run: the grid cell.
        dist: this process's place in the data-parallel group.
        base_eval: the base model's held-out metrics, when the sweep has them already, and
            base_examples its per-example numbers (``evaluation.evaluate``).
        progress: show a step bar on stderr (main process only).
    Returns:
        The run's manifest, as written (``{}`` on processes other than the main one).
    """
    t0 = time.perf_counter()
    plan = RunPlan(cfg, task, run, run_dir, dist, use_bf16(cfg.bf16, dist.device))
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)     # this run's peak, not the sweep's
    model = build_model(cfg, task, run).to(dist.device)
    # A₀, as peft drew it from the run's seed: a resumed run draws the same before loading
    initial_a = lora_a(model) if run.method == "lora" else None
    if base_eval is None or base_examples is None:
        base_examples = {}
        base_eval = evaluate(model, task.eval, kind=task.kind, device=dist.device, bf16=plan.bf16,
                             examples=base_examples)
    tokens_per_s, metrics = _train(plan, model, progress=progress)
    after_examples: dict = {}
    after = evaluate(model, task.eval, kind=task.kind, device=dist.device, bf16=plan.bf16,
                     examples=after_examples)
    metrics.append({"step": cfg.steps, "kind": "eval", **after})
    if plan.sharded:            # every process gathers; the main one saves the whole model
        state = full_state(model)
        model = build_model(cfg, task, run) if dist.main else None
        if model is not None:
            model.load_state_dict(state)
    if not dist.main:
        return {}
    updates = save_outputs(run_dir, model, run, base_name=cfg.model, metrics=metrics,
                           initial_a=initial_a, labels=task.label_names)
    manifest = run_manifest(plan, updates=updates,
                            trainable_params=sum(p.numel() for _, p in trainable(model)),
                            measured={"eval_before": base_eval, "eval_after": after,
                                      "heldout_before": base_examples,
                                      "heldout_after": after_examples,
                                      "eval_history": eval_history(base_eval, metrics),
                                      "late_train_rise": late_train_rise(metrics,
                                                                         steps=cfg.steps),
                                      "wall_time_s": round(time.perf_counter() - t0, 3),
                                      "tokens_per_s": tokens_per_s})
    write_manifest(run_dir, manifest)
    clear_checkpoint(run_dir)
    return manifest


def _train(plan: RunPlan, model, *, progress: bool) -> tuple[float | None, list[dict]]:
    """The run's steps from its checkpoint on: log, evaluate and checkpoint between them.

    Held-out evaluations: at the step by which the schedule has applied 80% of its rate
    (``late_step``: the split of ``late_gain_share``), every ``eval_every`` steps, and (the
    caller's) at the last step.

    Returns:
        (tokens per second over the steps taken here, None if none were; the metric rows).
    """
    from tqdm.auto import tqdm

    cfg, task, dist = plan.cfg, plan.task, plan.dist
    # shard (or wrap) first: FSDP replaces the parameters the optimizer must hold
    net = shard_fsdp(model, dist, bf16=plan.bf16) if plan.sharded else wrap_ddp(model, dist)
    params = dict(trainable(model))
    opt, sched = make_optimizer(list(params.values()), cfg, method=plan.run.method)
    start, metrics = (0, []) if plan.sharded else load_checkpoint(plan.run_dir, params, opt, sched)
    if start == 0:
        torch.manual_seed(plan.run.seed)        # dropout stream, identical for every method
    order = batch_order(task.train["input_ids"].shape[0], steps=cfg.steps,
                        per_step=cfg.batch_size * cfg.grad_accum, seed=plan.run.seed)
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=plan.run_dir.name, unit="step", leave=False,
               disable=not (progress and dist.main), file=sys.stderr)
    tokens, t_loop, tok_s = 0, time.perf_counter(), None
    steps = train_steps(net, task, order, cfg=cfg, dist=dist, bf16=plan.bf16, opt=opt,
                        sched=sched, start=start)
    for s in steps:
        tokens += tokens_in(task.train, order[s.step - 1], kind=task.kind)
        tok_s = tokens / max(time.perf_counter() - t_loop, 1e-9)
        metrics.append({"step": s.step, "kind": "train", "loss": s.loss, "lr": s.lr,
                        "tokens_per_s": tok_s})
        due = s.step == plan.late or cfg.eval_every and s.step % cfg.eval_every == 0
        if due and s.step < cfg.steps:
            ev = evaluate(model, task.eval, kind=task.kind, device=dist.device, bf16=plan.bf16)
            metrics.append({"step": s.step, "kind": "eval", **ev})
        bar.set_postfix(loss=f"{s.loss:.3f}", tok_s=f"{tok_s:.0f}")
        bar.update(1)
        if dist.main and s.step in plan.snapshot_steps:     # (none when sharded)
            save_snapshot(plan, model, s.step)      # before the checkpoint that passes it
        if dist.main and not plan.sharded and s.step % cfg.checkpoint_every == 0 \
                and s.step < cfg.steps:
            save_checkpoint(plan.run_dir, s.step, params, opt, sched, metrics)
    bar.close()
    return tok_s, metrics


def save_snapshot(plan: RunPlan, model, step: int) -> None:
    """Write the run's update at ``step`` to ``snapshots/`` (``store.runs.snapshot_path``).

    Under ``fork_rng``: reloading W₀ for a full run must not draw from the stream the next
    steps' dropout reads, so a run with snapshots trains exactly as one without.
    """
    with torch.random.fork_rng(devices=[]):
        if plan.run.method == "full":
            updates, _ = full_updates(model, plan.cfg.model)
        else:
            updates = lora_updates(model)
    snap = snapshot_path(plan.run_dir, step)
    snap.parent.mkdir(exist_ok=True)
    write_updates(snap, updates, method=plan.run.method, metadata={"step": str(step)})


def run_manifest(plan: RunPlan, *, updates: dict[str, torch.Tensor], trainable_params: int,
                 measured: dict) -> dict:
    """A finished run's manifest: the grid cell, the setup, the data, the measurements, and
    the training evidence (``rankscope.train.evidence``).

    Args:
        updates: the tensors of ``updates.safetensors``; trainable_params: parameters that
            trained.
        measured: eval_before, eval_after, their per-example numbers heldout_before and
            heldout_after, eval_history, late_train_rise, wall_time_s and tokens_per_s.
    """
    cfg, task, run, dist = plan.cfg, plan.task, plan.run, plan.dist
    lora = run.method == "lora"
    history = measured["eval_history"]
    planted = {} if task.planted_hash is None else {
        "planted_hash": task.planted_hash, "planted_rank": cfg.planted_rank,
        "planted_scale": cfg.planted_scale, "planted_seed": cfg.planted_seed}
    n_modules = sum(k.endswith((".delta", ".lora_A")) for k in updates)
    return {
        "run": run.name, "method": run.method, "rank": run.rank, "seed": run.seed,
        "lora_alpha": cfg.lora_alpha(run.rank) if lora else None,
        "alpha_policy": cfg.alpha_policy if lora else None, "protocol": cfg.protocol,
        "equivalence_metric": cfg.equivalence_metric,
        "equivalence_margin": cfg.equivalence_margin,
        "targets": list(cfg.targets) if lora else "all", "n_modules": n_modules,
        "full_scope": cfg.full_scope,
        "lr": cfg.lr_lora if lora else cfg.lr_full, "lr_searched": cfg.lr_search,
        "model": cfg.model, "model_path": str(resolve_model(cfg.model)),
        **(label_file(task.label_names) if task.label_names else {}),
        "task": cfg.task, "data": cfg.data, "task_kind": task.kind,
        "data_hash": task.data_hash, "split_hash": task.split_hash,
        "n_train_examples": task.n_train_examples, "n_eval_examples": task.n_eval_examples,
        "steps": cfg.steps, "tokens_per_step": cfg.batch_size * cfg.grad_accum * cfg.max_len,
        "device": str(dist.device), "world_size": dist.world, "bf16_autocast": plan.bf16,
        "strategy": "fsdp" if plan.sharded else "ddp" if dist.world > 1 else None,
        "wall_time_s": measured["wall_time_s"], "tokens_per_s": measured["tokens_per_s"],
        "peak_memory_mb": round(peak_memory_mb(dist.device), 1),
        "trainable_params": trainable_params,
        "eval_before": measured["eval_before"], "eval_after": measured["eval_after"],
        "heldout_before": measured["heldout_before"], "heldout_after": measured["heldout_after"],
        "eval_history": history, "late_step": plan.late,
        "late_gain_share": late_gain_share(history, late=plan.late, steps=cfg.steps),
        "late_train_rise": measured["late_train_rise"],
        "snapshot_steps": sorted(plan.snapshot_steps),
        "delta_fro": delta_fro(updates), "a_moved": a_moved(updates) if lora else None,
        **planted, **provenance(),
    }


def save_outputs(run_dir: Path, model, run: RunId, *, base_name: str, metrics: list[dict],
                 initial_a: dict[str, torch.Tensor] | None = None,
                 labels: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Write a trained run's updates (and others, or its peft adapter) and its metrics.

    Args:
        model: the trained model (not a DDP wrapper); left in eval mode.
        base_name: the model it was fine-tuned from (full runs subtract its W_0).
        metrics: the rows of ``metrics.jsonl``.
        initial_a: LoRA only, {module: A₀}, saved as "<module>.lora_A0".
        labels: a classification task's label names, in the head's order: a LoRA run's
            adapter folder gets ``labels.json`` (its head cannot be loaded without their count).
    Returns:
        The tensors written to ``updates.safetensors``.
    """
    model.eval()
    if run.method == "full":
        updates, others = full_updates(model, base_name)
        write_updates(run_dir / OTHERS, others, method="others")
    else:
        updates = lora_updates(model, initial_a=initial_a)
        with atomic_dir(run_dir / "adapter", overwrite=True) as tmp:
            model.save_pretrained(tmp)
            if labels:
                atomic_write_text(tmp / LABELS, json.dumps(label_file(labels), indent=2) + "\n")
    write_updates(run_dir / UPDATES, updates, method=run.method)
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
    return updates
