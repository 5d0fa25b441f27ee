"""The truncation test: rebuild W_0 + trunc_k(ΔW) for growing k and re-evaluate the model.

The smallest k that keeps a chosen share of full fine-tuning's gain over W_0 is the update's
functional intrinsic rank (docs/science.md). Every parameter that is not a linear weight
(norms, embeddings, a classification head) is set to its fine-tuned value, so that at the full
rank the rebuilt model is the fine-tuned one and the gain is 100%.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

from rankscope.analysis.decompose import update_svd
from rankscope.analysis.deltas import from_run
from rankscope.errors import InputError
from rankscope.linalg.spectra import truncate
from rankscope.store.runs import (OTHERS, SWEEP_FILE, find_runs, read_manifest, read_tensors,
                                  sweep_root)
from rankscope.train.config import build_sweep
from rankscope.train.data import prepare
from rankscope.train.device import setup_dist, use_bf16
from rankscope.train.evaluation import evaluate
from rankscope.train.model_setup import load_task_model
from rankscope.train.models import linear_weight

SHARES = (0.9, 0.95)
# A share is a ratio of metric differences: a curve built to reach 90% exactly can land at
# 0.8999999999999999, so "keeps the share" allows this much rounding below it.
SHARE_TOL = 1e-9


def _sweep_config(sweep_dir: Path):
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise InputError(f"{sweep_dir} has no {SWEEP_FILE}: the truncation test needs the sweep's "
                         "data settings to rebuild its held-out split")
    return build_sweep(yaml_path=path)


def _fine_tuned_model(cfg, run_dir: Path, manifest: dict, task):
    """The task model with every non-ΔW parameter at its fine-tuned value, on the CPU."""
    model = load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    if manifest["method"] == "full":
        others, _ = read_tensors(run_dir / OTHERS)
        missing = set(others) - {n for n, _ in model.named_parameters()}
        if missing:
            raise InputError(f"{run_dir}/{OTHERS} names {sorted(missing)[0]}, absent from the model")
        model.load_state_dict(others, strict=False)
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, run_dir / "adapter").merge_and_unload()


def _svds(run_dir: Path, device: torch.device) -> list[tuple]:
    """(module name, U, S, Vh) of every update of a run (``update_svd``), float32 on ``device``."""
    return [(d.name, *(t.to(device, torch.float32) for t in update_svd(d)))
            for d in from_run(run_dir)]


def _weight_slots(model, svds: list[tuple], device: torch.device, *, merged: bool):
    """Move ``model`` to ``device``; then each module's weight slot and its W_0 there.

    A slot is the module's weight as y = W x sees it (``linear_weight``): for a Conv1D (GPT-2)
    a transposed view of the stored tensor. Moving a model replaces its tensors, so a view taken
    before the move would write into the CPU copy the model no longer uses: slots are taken
    after it. ``merged``: the model holds W_0 + ΔW (a merged LoRA), else W_0.

    Returns:
        ({name: slot (d_out, d_in)}, {name: W_0 (d_out, d_in)}), on ``device``.
    """
    model.to(device)
    slots, w0 = {}, {}
    with torch.no_grad():
        for name, U, S, Vh in svds:
            w = linear_weight(model.get_submodule(name))  # (d_out, d_in), a view into the model
            slots[name] = w
            w0[name] = w - (U * S) @ Vh if merged else w.clone()
    return slots, w0


def truncation_table(run_dir: Path, cfg, task, *, ks: tuple[int, ...], device: torch.device,
                     progress: bool = True) -> pd.DataFrame:
    """The held-out metric of W_0 + trunc_k(ΔW) for each k, plus k = full rank.

    trunc_k is ``spectra.truncate`` on each module's SVD (a module with fewer than k singular
    values keeps all of them); the largest k is the largest number of singular values of any
    module, where every module holds its whole ΔW and the model is the fine-tuned one.

    Returns:
        One row per k: ``run, method, rank, seed, k, is_full_rank, eval_<metric>…,
        before_<metric>…`` (before: W_0's metrics, from the run's manifest).
    """
    from tqdm.auto import tqdm

    manifest = read_manifest(run_dir)
    model = _fine_tuned_model(cfg, run_dir, manifest, task)
    svds = _svds(run_dir, device)
    slots, w0 = _weight_slots(model, svds, device, merged=manifest["method"] != "full")
    bf16 = use_bf16(cfg.bf16, device)
    max_rank = max(S.numel() for _, _, S, _ in svds)
    rows = []
    for k in tqdm([k for k in ks if k < max_rank] + [max_rank], desc=f"truncate {run_dir.name}",
                  disable=not progress, file=sys.stderr, leave=False):
        with torch.no_grad():
            for name, U, S, Vh in svds:
                slots[name].copy_(w0[name] + truncate(U, S, Vh, min(k, S.numel())))
        ev = evaluate(model, task.eval, kind=task.kind, device=device, bf16=bf16)
        rows.append({"run": run_dir.name, "method": manifest["method"], "rank": manifest.get("rank"),
                     "seed": manifest.get("seed"), "k": k, "is_full_rank": k == max_rank,
                     **{f"eval_{m}": v for m, v in ev.items()},
                     **{f"before_{m}": v for m, v in manifest["eval_before"].items()}})
    return pd.DataFrame(rows)


def gain_shares(curve: pd.DataFrame) -> pd.DataFrame:
    """Add each k's share of the full-rank gain over W_0 (accuracy up, or loss down).

    share_k = (m_k − m_0) / (m_full − m_0) for accuracy (when the curve has it), else
    (m_0 − m_k) / (m_0 − m_full) for loss; m_0 is W_0's metric (``before_<metric>``).

    Args:
        curve: rows of ``truncation_table`` (one or more runs), with ``is_full_rank``.
    Returns:
        ``curve`` with ``metric`` (accuracy or loss) and ``gain_share``; NaN for every k of a
        run whose full rank did not improve on W_0 (no gain: a share of it means nothing).
    """
    key = "accuracy" if "eval_accuracy" in curve else "loss"
    sign = 1.0 if key == "accuracy" else -1.0
    out = []
    for _, g in curve.groupby("run", sort=False):
        full = g[g["is_full_rank"]][f"eval_{key}"].iloc[0]
        before = g[f"before_{key}"].iloc[0]
        gain = sign * (full - before)
        # no gain (or a loss) over W_0: a share of it means nothing, so it stays undefined
        g = g.assign(metric=key, gain_share=(sign * (g[f"eval_{key}"] - before)) / gain
                     if gain > 0 else float("nan"))
        out.append(g)
    return pd.concat(out, ignore_index=True)


def functional_rank(curve: pd.DataFrame, *, shares=SHARES) -> pd.DataFrame:
    """Per run and share: the smallest k keeping that share of the gain.

    Args:
        curve: rows of ``gain_shares``.
        shares: the shares of the gain to keep, e.g. 0.9 and 0.95.
    Returns:
        One row per run and share: ``run, method, rank, seed, share, k``; k is <NA> when no k
        keeps the share (or the run had no gain, so every share is NaN).
    """
    rows = []
    for run, g in curve.groupby("run", sort=False):
        g = g.sort_values("k")
        for share in shares:
            ok = g[g["gain_share"] >= share - SHARE_TOL]
            rows.append({"run": run, "method": g["method"].iloc[0], "rank": g["rank"].iloc[0],
                         "seed": g["seed"].iloc[0], "share": share,
                         "k": int(ok["k"].iloc[0]) if len(ok) else None})
    return pd.DataFrame(rows).astype({"k": "Int64"})


def truncate_sweep(path: str | Path, *, ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                   lora_min_rank: int | None = None, device: str = "auto",
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The truncation test on a sweep's full runs (and LoRA runs of rank ≥ ``lora_min_rank``).

    Returns:
        ``(curve, summary)``: one row per run and k with the metric and its gain share; and
        the functional rank per run at 90% and 95% of the gain.
    Raises:
        InputError: no full run to truncate, a bad k or LoRA rank, a sweep folder without
            its config, or runs evaluated on another split than the config gives.
    """
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k <= 0 for k in ks):
        raise InputError(f"ks: every k must be a positive integer, got {list(ks)}")
    if lora_min_rank is not None and lora_min_rank <= 0:
        raise InputError(f"lora_min_rank: must be a positive integer, got {lora_min_rank}")
    path = Path(path)
    runs = find_runs(path)
    chosen = [r for r in runs if _wanted(read_manifest(r), lora_min_rank)]
    if not chosen:
        lora = "" if lora_min_rank is None else f" (or LoRA run of rank ≥ {lora_min_rank})"
        raise InputError(f"no full run{lora} in {path} to truncate")
    cfg = _sweep_config(sweep_root(path))
    task = prepare(cfg)
    dist = setup_dist(device)
    for r in chosen:
        if read_manifest(r).get("split_hash") != task.split_hash:
            raise InputError(f"{r} was evaluated on another held-out split than {SWEEP_FILE} "
                             "gives")
    curve = pd.concat([truncation_table(r, cfg, task, ks=tuple(sorted(set(ks))), device=dist.device,
                                        progress=progress) for r in chosen], ignore_index=True)
    curve = gain_shares(curve)
    return curve, functional_rank(curve)


def _wanted(manifest: dict, lora_min_rank: int | None) -> bool:
    if manifest["method"] == "full":
        return True
    return lora_min_rank is not None and (manifest.get("rank") or 0) >= lora_min_rank
