"""``recommend --validate``: retrain LoRA configs on the sweep's data, seeds and steps.

The recommendation is tested, not asserted: the recommended config (per-module ranks through
``rank_pattern``) and the uniform rank nearest its parameter count are trained exactly as the
sweep trained its LoRA runs (same held-out split, batches, schedule, learning rate, seeds,
and the sweep's own loop, ``rankscope.train.loop.train_steps``) and evaluated on the same
held-out split. The peft model is built here from the config, because a sweep run has one rank
for every module.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from rankscope.errors import InputError
from rankscope.store.atomic import atomic_dir, atomic_write_json
from rankscope.store.runs import sweep_root
from rankscope.train.config import read_sweep_config
from rankscope.train.device import setup_dist, use_bf16
from rankscope.train.evaluation import base_evaluation, evaluate
from rankscope.train.loop import train_in_process
from rankscope.train.model_setup import load_task_model


def build_lora(cfg, task, config: dict, *, seed: int):
    """The task model wrapped by peft with ``LoraConfig(**config)``, LoRA init from ``seed``."""
    from peft import LoraConfig, get_peft_model

    model = load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(**config))


def describe(config: dict) -> str:
    """A config's ranks in a few words: ``r = 8`` or ``r = 8; 4 modules other ranks (2–16)``."""
    pattern = config.get("rank_pattern") or {}
    if not pattern:
        return f"r = {config['r']}"
    lo, hi = min(pattern.values()), max(pattern.values())
    return f"r = {config['r']}; {len(pattern)} modules at other ranks ({lo}–{hi})"


def validate(runs: str | Path, configs: dict[str, dict], *, sets: list, out: str | Path,
             progress: bool = True, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Train every config for every seed of the sweep and evaluate it; write ``validate.csv``.

    Args:
        configs: {label: a ``peft.LoraConfig`` dict}; equal configs are trained once.
        sets: the sweep's DeltaSets (``recommend.inputs.check_runs``), whose held-out split
            the retraining must share.
        out: the results folder; adapters are saved to ``out/validate/<label>-s<seed>/``
            and the configs to ``out/validate/configs.json``.
    Returns:
        One row per config and seed: ``config, ranks, seed, trainable_params, steps,
        before_<metric>…, after_<metric>…, final_train_loss, wall_time_s``.
    Raises:
        InputError: no sweep.yaml, or a sweep whose held-out split cannot be rebuilt.
    """
    from rankscope.store.results import VALIDATED, save_tables
    from rankscope.train.data import prepare

    cfg = read_sweep_config(runs, needed_by="--validate")
    task = prepare(cfg)
    if any(s.meta.get("split_hash") not in (None, task.split_hash) for s in sets):
        raise InputError(f"{runs} was evaluated on another held-out split than its sweep.yaml gives")
    device = setup_dist(cfg.device).device
    bf16 = use_bf16(cfg.bf16, device)
    out, rows, done = Path(out), [], {}
    for label, config in configs.items():
        key = json.dumps(config, sort_keys=True)
        for seed in cfg.seeds:
            if (key, seed) not in done:      # else the same config under another label
                done[(key, seed)] = _validate_one(cfg, task, config, runs=Path(runs),
                                                  out=out / "validate" / f"{label}-s{seed}",
                                                  seed=seed, device=device, bf16=bf16,
                                                  progress=progress)
                _log_row(log, label, config, done[(key, seed)])
            rows.append({"config": label, **done[(key, seed)]})
    table = pd.DataFrame(rows)
    save_tables(out, {"validate": table}, inputs={"runs": str(runs)})
    atomic_write_json(out / VALIDATED, configs)     # what validate.csv tested
    return table


def _validate_one(cfg, task, config: dict, *, runs: Path, out: Path, seed: int,
                  device: torch.device, bf16: bool, progress: bool) -> dict:
    """Train and evaluate one config and seed, save its adapter to ``out``; its table row."""
    t0 = time.perf_counter()
    model = build_lora(cfg, task, config, seed=seed).to(device)
    # B = 0: the fresh adapter computes the base model, whose metrics the sweep cached
    before = base_evaluation(model, task, sweep_root(runs), device=device, bf16=bf16,
                             write=False)
    losses = train_in_process(model, task, cfg=cfg, method="lora", seed=seed, device=device,
                              bf16=bf16, progress=progress, desc=f"{out.name}")
    after = evaluate(model, task.eval, kind=task.kind, device=device, bf16=bf16)
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
    return {"ranks": describe(config), "seed": seed,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "steps": cfg.steps, **{f"before_{k}": v for k, v in before.items()},
            **{f"after_{k}": v for k, v in after.items()},
            "final_train_loss": losses[-1] if losses else None,
            "wall_time_s": round(time.perf_counter() - t0, 2)}


def _log_row(log: Callable[[str], None], label: str, config: dict, row: dict) -> None:
    metrics = [k.removeprefix("after_") for k in row if k.startswith("after_")]
    log(f"validate {label:<12} seed {row['seed']}: {describe(config)}, "
        f"{row['trainable_params']:,} params, " +
        ", ".join(f"{k} {row['before_' + k]:.4g} → {row['after_' + k]:.4g}"
                  for k in metrics if k != "perplexity"))

