"""Held-out evaluation, and the base model's evaluation that a sweep computes once and caches."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rankscope.store.atomic import atomic_write_json
from rankscope.train.corpora import DISTILL
from rankscope.train.device import autocast
from rankscope.train.objective import row_losses, trim_padding

BASE_EVAL = "base_eval.json"        # in the sweep folder: {"split_hash", "metrics", "examples"}


@torch.no_grad()
def evaluate(model, data: dict[str, torch.Tensor], *, kind: str, device: torch.device,
             bf16: bool, batch_size: int = 16, examples: dict | None = None) -> dict[str, float]:
    """Held-out loss per target, and perplexity (lm, sft) or accuracy (cls).

    Args:
        data: the held-out tensors (``TaskData.eval``); for distill, a ``DistillSplit``,
            whose teacher gives the targets.
        kind: "lm", "sft", "cls" or "distill".
        bf16: evaluate under bf16 autocast, as the run trains.
        examples: when given, filled with each held-out example's own numbers, in the split's
            order, for paired comparisons between runs (``analysis.equivalence``): "loss" (its
            mean loss per target) and, for cls, "correct" (1.0 or 0.0).
    Returns:
        {"loss", "perplexity"}, {"loss", "accuracy"} or, for distill, {"loss"}: the
        distillation loss per token (lower is better); the model's train/eval mode is kept.
    """
    was_training = model.training
    model.eval()
    sums, counts, hits = [], [], []
    n = data["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        batch = trim_padding({k: v[i:i + batch_size].to(device) for k, v in data.items()})
        with autocast(device, bf16):
            s, c, h = row_losses(model, batch, kind=kind, teacher=getattr(data, "teacher", None))
        sums.append(s.float().cpu())
        counts.append(c.cpu())
        if h is not None:
            hits.append(h.float().cpu())
    model.train(was_training)
    sums, counts = torch.cat(sums).double(), torch.cat(counts).double()   # (n,)
    result = {"loss": float(sums.sum()) / max(float(counts.sum()), 1.0)}
    if kind == "cls":
        result["accuracy"] = float(torch.cat(hits).sum()) / max(n, 1)
    elif kind != DISTILL:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if examples is not None:
        examples["loss"] = (sums / counts.clamp(min=1)).tolist()
        if kind == "cls":
            examples["correct"] = torch.cat(hits).tolist()
    return result


def base_evaluation(model, task, sweep_dir: Path, *, device: torch.device, bf16: bool,
                    write: bool = True, examples: dict | None = None) -> dict[str, float]:
    """The base model's held-out metrics, read from ``sweep_dir``'s cache when it holds them.

    The cache is keyed by the held-out split (and a planted task's teacher): a sweep computes
    it once for all its runs, and ``recommend --validate`` reads the same numbers. ``model``
    must be the base model (a fresh LoRA adapter, B = 0, computes the same function). The
    cache keeps each example's numbers too; one written before it did is computed again.

    Args:
        task: the sweep's TaskData (``eval`` and ``split_hash`` are read).
        write: write the cache when it was computed (the main process of a sweep).
        examples: filled with the base model's per-example numbers (``evaluate``).
    Returns:
        ``evaluate``'s metrics.
    """
    path = Path(sweep_dir) / BASE_EVAL
    planted = getattr(task, "planted_hash", None)
    key = {"split_hash": task.split_hash, **({"planted_hash": planted} if planted else {})}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("split_hash") == task.split_hash and cached.get("planted_hash") == planted \
                and "examples" in cached:
            if examples is not None:
                examples.update(cached["examples"])
            return cached["metrics"]
    found: dict = {}
    metrics = evaluate(model.to(device), task.eval, kind=task.kind, device=device, bf16=bf16,
                       examples=found)
    if write:
        atomic_write_json(path, {**key, "metrics": metrics, "examples": found})
    if examples is not None:
        examples.update(found)
    return metrics
