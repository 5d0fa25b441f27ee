"""``recommend --validate``: retrain LoRA configs on the sweep's data, seeds and steps.

The recommendation is tested, not asserted: the recommended config (per-module ranks through
``rank_pattern``) and the uniform rank nearest its parameter count are trained exactly as the
sweep trained its LoRA runs (same held-out split, batches, schedule, learning rate, seeds) and
evaluated on the same held-out split. The peft model is built here from the config, around
the helpers of ``rankscope.train.parts``, because a sweep run has one rank for every module.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from rankscope.train import parts as T
from rankscope.errors import InputError
from rankscope.store.atomic import atomic_write_json


def sweep_config(runs: str | Path):
    """The SweepConfig a sweep was trained with (its ``sweep.yaml``).

    Raises:
        InputError: the sweep folder has no sweep.yaml.
    """
    from rankscope.train.config import build_sweep
    from rankscope.recommend.stage import sweep_root

    path = sweep_root(runs) / "sweep.yaml"
    if not path.is_file():
        raise InputError(f"--validate needs the sweep's settings, and {path} is missing")
    return build_sweep(yaml_path=path)


def build_lora(cfg, task, config: dict, *, seed: int):
    """The task model wrapped by peft with ``LoraConfig(**config)``, LoRA init from ``seed``."""
    from peft import LoraConfig, get_peft_model

    model = T.load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(**config))


def train_steps(model, task, *, cfg, seed: int, device: torch.device, bf16: bool,
                progress: bool = False, desc: str = "validate") -> list[float]:
    """Train ``model``'s trainable parameters as a sweep's LoRA run; returns the step losses.

    The same batches (``batch_order`` from the seed), warm-up and decay, AdamW at ``lr_lora``,
    clipping, and the loss summed over a step's targets then divided by their count.
    """
    from tqdm.auto import tqdm

    from rankscope.train.loop import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, cfg, method="lora")       # the sweep's own optimizer
    torch.manual_seed(seed)
    order = T.batch_order(task.train["input_ids"].shape[0], steps=cfg.steps,
                          per_step=cfg.batch_size * cfg.grad_accum, seed=seed)
    model.train()
    losses = []
    for idx in tqdm(order, desc=desc, unit="step", leave=False, disable=not progress, file=sys.stderr):
        n_targets = max(T.tokens_in(task, idx) if task.kind != "cls" else idx.numel(), 1)
        total = 0.0
        for mb in idx.view(cfg.grad_accum, cfg.batch_size):
            batch = {k: v[mb].to(device) for k, v in task.train.items()}
            with T.autocast(device, bf16):
                loss, _ = T.loss_sum(model, batch, kind=task.kind)
            (loss / n_targets).backward()
            total += float(loss.detach())
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n_targets)
    return losses


def describe(config: dict) -> str:
    """A config's ranks in a few words: ``r = 8`` or ``r = 8; 4 modules other ranks (2–16)``."""
    pattern = config.get("rank_pattern") or {}
    if not pattern:
        return f"r = {config['r']}"
    lo, hi = min(pattern.values()), max(pattern.values())
    return f"r = {config['r']}; {len(pattern)} modules at other ranks ({lo}–{hi})"


def _base_eval(runs: Path, task, model, *, device, bf16) -> dict:
    cached = runs / "base_eval.json"
    if cached.exists():
        doc = json.loads(cached.read_text())
        if doc.get("split_hash") == task.split_hash:
            return doc["metrics"]
    return T.evaluate(model, task.eval, kind=task.kind, device=device, bf16=bf16)


def validate(runs: str | Path, configs: dict[str, dict], *, out: str | Path,
             progress: bool = True, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train every config for every seed of the sweep and evaluate it; write ``validate.csv``.

    Args:
        configs: {label: a ``peft.LoraConfig`` dict}; equal configs are trained once.
        out: the results folder; adapters are saved to ``out/validate/<label>-s<seed>/``
            and the configs to ``out/validate/configs.json``.
    Returns:
        One row per config and seed: ``config, ranks, seed, trainable_params, steps,
        before_<metric>…, after_<metric>…, final_train_loss, wall_time_s``.
    Raises:
        InputError: no sweep.yaml, or a sweep whose held-out split cannot be rebuilt.
    """
    from rankscope.recommend.stage import VALIDATED, check_runs, sweep_root
    from rankscope.store.results import save_tables
    from rankscope.train.sweep import prepare

    sets = check_runs(runs)
    cfg = sweep_config(runs)
    task = prepare(cfg)
    if any(s.meta.get("split_hash") not in (None, task.split_hash) for s in sets):
        raise InputError(f"{runs} was evaluated on another held-out split than its sweep.yaml gives")
    dist = T.setup_dist(cfg.device)
    bf16 = T.use_bf16(cfg.bf16, dist.device)
    out, rows, done = Path(out), [], {}
    for label, config in configs.items():
        key = json.dumps(config, sort_keys=True)
        for seed in cfg.seeds:
            if (key, seed) in done:          # the same config under another label
                rows.append({**done[(key, seed)], "config": label})
                continue
            t0 = time.perf_counter()
            model = build_lora(cfg, task, config, seed=seed).to(dist.device)
            before = _base_eval(sweep_root(runs), task, model, device=dist.device, bf16=bf16)
            losses = train_steps(model, task, cfg=cfg, seed=seed, device=dist.device, bf16=bf16,
                                 progress=progress, desc=f"{label} s{seed}")
            after = T.evaluate(model, task.eval, kind=task.kind, device=dist.device, bf16=bf16)
            model.save_pretrained(out / "validate" / f"{label}-s{seed}")
            row = {"config": label, "ranks": describe(config), "seed": seed,
                   "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "steps": cfg.steps, **{f"before_{k}": v for k, v in before.items()},
                   **{f"after_{k}": v for k, v in after.items()},
                   "final_train_loss": losses[-1] if losses else None,
                   "wall_time_s": round(time.perf_counter() - t0, 2)}
            done[(key, seed)] = row
            rows.append(row)
            log(f"validate {label:<12} seed {seed}: {describe(config)}, "
                f"{row['trainable_params']:,} params, " +
                ", ".join(f"{k} {before[k]:.4g} → {after[k]:.4g}" for k in after if k != "perplexity"))
    table = pd.DataFrame(rows)
    save_tables(out, {"validate": table}, inputs={"runs": str(runs)})
    atomic_write_json(out / VALIDATED, configs)     # what validate.csv tested
    return table
