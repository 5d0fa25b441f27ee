"""Held-out evaluation, and the base model's evaluation that a sweep computes once and caches."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rankscope.store.atomic import atomic_write_json
from rankscope.train.corpora import DISTILL
from rankscope.train.device import autocast
from rankscope.train.objective import loss_sum, trim_padding

BASE_EVAL = "base_eval.json"        # in the sweep folder: {"split_hash", "metrics"}


@torch.no_grad()
def evaluate(model, data: dict[str, torch.Tensor], *, kind: str, device: torch.device,
             bf16: bool, batch_size: int = 16) -> dict[str, float]:
    """Held-out loss per target, and perplexity (lm, sft) or accuracy (cls).

    Args:
        data: the held-out tensors (``TaskData.eval``); for distill, a ``DistillSplit``,
            whose teacher gives the targets.
        kind: "lm", "sft", "cls" or "distill".
        bf16: evaluate under bf16 autocast, as the run trains.
    Returns:
        {"loss", "perplexity"}, {"loss", "accuracy"} or, for distill, {"loss"}: the
        distillation loss per token (lower is better); the model's train/eval mode is kept.
    """
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    n = data["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        batch = trim_padding({k: v[i:i + batch_size].to(device) for k, v in data.items()})
        with autocast(device, bf16):
            if kind == "cls":           # one forward pass for both the loss and the accuracy
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits.float()
                loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
                m = batch["labels"].numel()
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                loss, m = loss_sum(model, batch, kind=kind, teacher=getattr(data, "teacher", None))
        total, count = total + float(loss), count + m
    model.train(was_training)
    result = {"loss": total / max(count, 1)}
    if kind == "cls":
        result["accuracy"] = correct / max(count, 1)
    elif kind != DISTILL:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


def base_evaluation(model, task, sweep_dir: Path, *, device: torch.device, bf16: bool,
                    write: bool = True) -> dict[str, float]:
    """The base model's held-out metrics, read from ``sweep_dir``'s cache when it holds them.

    The cache is keyed by the held-out split (and a planted task's teacher): a sweep computes
    it once for all its runs, and ``recommend --validate`` reads the same numbers. ``model`` must be the base model (a fresh
    LoRA adapter, B = 0, computes the same function).

    Args:
        task: the sweep's TaskData (``eval`` and ``split_hash`` are read).
        write: write the cache when it was computed (the main process of a sweep).
    Returns:
        ``evaluate``'s metrics.
    """
    path = Path(sweep_dir) / BASE_EVAL
    planted = getattr(task, "planted_hash", None)
    key = {"split_hash": task.split_hash, **({"planted_hash": planted} if planted else {})}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("split_hash") == task.split_hash and cached.get("planted_hash") == planted:
            return cached["metrics"]
    metrics = evaluate(model.to(device), task.eval, kind=task.kind, device=device, bf16=bf16)
    if write:
        atomic_write_json(path, {**key, "metrics": metrics})
    return metrics
