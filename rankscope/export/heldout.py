"""The held-out metric of an exported adapter beside its source's, when the source is a sweep run.

The adapter is loaded the way a user loads it: the base model with the task's head
(``load_task_model``), then ``PeftModel.from_pretrained`` on the folder export wrote. It is
evaluated on the run's own held-out split, rebuilt from the sweep's ``sweep.yaml`` (the split's
hash must match the run's manifest), in float32 on the CPU; the source's metric is the run's
``eval_after`` and the base model's its ``eval_before``, measured by the same ``evaluate``
when the run finished (under bf16 autocast where the run trained under it: its manifest says).
"""
from __future__ import annotations

from pathlib import Path

import torch

from rankscope.errors import InputError
from rankscope.store.runs import read_manifest
from rankscope.train.config import read_sweep_config
from rankscope.train.data import prepare
from rankscope.train.evaluation import evaluate
from rankscope.train.model_setup import load_task_model


def heldout_metrics(run_dir: str | Path, adapter_dir: str | Path) -> dict:
    """{"exported", "source", "base", …}: held-out metrics of the adapter, the run and the base
    model; or {"skipped": why} when the run's data cannot be rebuilt (no sweep.yaml beside it,
    or a split that is not the run's): the export stands without its evaluation."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    try:
        cfg = read_sweep_config(run_dir, needed_by="the exported adapter's held-out evaluation")
        task = prepare(cfg)
    except InputError as e:
        return {"skipped": str(e)}
    if task.split_hash != manifest.get("split_hash"):
        return {"skipped": f"{run_dir} was evaluated on another held-out split than its "
                           "sweep's sweep.yaml gives"}
    model = load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    exported = evaluate(model, task.eval, kind=task.kind, device=torch.device("cpu"), bf16=False)
    return {"split": "held-out", "n_examples": task.n_eval_examples, "exported": exported,
            "source": manifest.get("eval_after"), "base": manifest.get("eval_before"),
            "precision": "float32", "source_bf16": bool(manifest.get("bf16_autocast"))}
