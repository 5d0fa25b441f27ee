"""The truncation test: rebuild W_0 + trunc_k(ΔW) for growing k and re-evaluate the model.

Every parameter that is not a linear weight (norms, embeddings, a classification head) is set
to its fine-tuned value, so that at the full rank the rebuilt model is the fine-tuned one. The
baseline is k = 0 (every linear weight at W_0, the rest fine-tuned), not the base model: the
non-linear parameters' gain is not rank. Each k's share of the gain is measured from k = 0,
and the smallest k that keeps a chosen share is the update's functional intrinsic rank; the
k = 0 model's own share of the gain over the base model is reported beside it
(docs/science.md, "The truncation test's baseline").
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
from rankscope.store.runs import OTHERS, SWEEP_FILE, find_runs, read_manifest, read_tensors
from rankscope.train.config import read_sweep_config
from rankscope.train.data import prepare
from rankscope.train.device import setup_dist, use_bf16
from rankscope.train.evaluation import evaluate
from rankscope.train.model_setup import load_task_model
from rankscope.train.models import linear_weight

SHARES = (0.9, 0.95)
# A share is a ratio of metric differences: a curve built to reach 90% exactly can land at
# 0.8999999999999999, so "keeps the share" allows this much rounding below it.
SHARE_TOL = 1e-9


def _fine_tuned_model(cfg, run_dir: Path, manifest: dict, task, names: list[str]):
    """The task model with every non-ΔW parameter at its fine-tuned value, on the CPU, and the
    exact W_0 (d_out, d_in) of each module in ``names``: the base model's own values, taken
    before a LoRA adapter is merged (not W_0 + ΔW − ΔW, which rounds)."""
    model = load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    w0 = {n: linear_weight(model.get_submodule(n)).detach().clone() for n in names}
    if manifest["method"] == "full":
        others, _ = read_tensors(run_dir / OTHERS)
        missing = set(others) - {n for n, _ in model.named_parameters()}
        if missing:
            raise InputError(f"{run_dir}/{OTHERS} names {sorted(missing)[0]}, absent from the model")
        model.load_state_dict(others, strict=False)
        return model, w0
    from peft import PeftModel

    return PeftModel.from_pretrained(model, run_dir / "adapter").merge_and_unload(), w0


def _svds(run_dir: Path, device: torch.device) -> list[tuple]:
    """(module name, U, S, Vh) of every update of a run (``update_svd``), float32 on ``device``."""
    return [(d.name, *(t.to(device, torch.float32) for t in update_svd(d)))
            for d in from_run(run_dir)]


def _weight_slots(model, svds: list[tuple], device: torch.device, *, merged: bool,
                  w0: dict[str, torch.Tensor] | None = None):
    """Move ``model`` to ``device``; then each module's weight slot and its W_0 there.

    A slot is the module's weight as y = W x sees it (``linear_weight``): for a Conv1D (GPT-2)
    a transposed view of the stored tensor. Moving a model replaces its tensors, so a view taken
    before the move would write into the CPU copy the model no longer uses: slots are taken
    after it. W_0 is ``w0`` when given (exact), else: ``merged``, the model holds W_0 + ΔW (a
    merged LoRA) and W_0 = slot − ΔW; not merged, the slot's own value.

    Returns:
        ({name: slot (d_out, d_in)}, {name: W_0 (d_out, d_in)}), on ``device``.
    """
    model.to(device)
    slots, base = {}, {}
    with torch.no_grad():
        for name, U, S, Vh in svds:
            w = linear_weight(model.get_submodule(name))  # (d_out, d_in), a view into the model
            slots[name] = w
            if w0 is not None:
                base[name] = w0[name].to(device=device, dtype=w.dtype)
            else:
                base[name] = w - (U * S) @ Vh if merged else w.clone()
    return slots, base


def set_rank(slots: dict, w0: dict, svds: list[tuple], k: int) -> None:
    """Write W_0 + trunc_k(ΔW) into every slot (a module with fewer than k singular values keeps
    all of them); k = 0 writes W_0 itself, exactly."""
    with torch.no_grad():
        for name, U, S, Vh in svds:
            if k == 0:
                slots[name].copy_(w0[name])
            else:
                slots[name].copy_(w0[name] + truncate(U, S, Vh, min(k, S.numel())))


def truncation_table(run_dir: Path, cfg, task, *, ks: tuple[int, ...], device: torch.device,
                     progress: bool = True) -> pd.DataFrame:
    """The held-out metric of W_0 + trunc_k(ΔW) for k = 0, each k, and k = full rank.

    trunc_k is ``spectra.truncate`` on each module's SVD (``set_rank``); k = 0 is every linear
    weight at W_0 exactly with the rest fine-tuned (the baseline the gain is shared from); the
    largest k is the largest number of singular values of any module, where every module holds
    its whole ΔW and the model is the fine-tuned one.

    Returns:
        One row per k: ``run, method, rank, seed, k, is_full_rank, eval_<metric>…,
        before_<metric>…`` (before: the base model's metrics, from the run's manifest).
    """
    from tqdm.auto import tqdm

    manifest = read_manifest(run_dir)
    svds = _svds(run_dir, device)
    model, base = _fine_tuned_model(cfg, run_dir, manifest, task, [n for n, *_ in svds])
    slots, w0 = _weight_slots(model, svds, device, merged=manifest["method"] != "full", w0=base)
    bf16 = use_bf16(cfg.bf16, device)
    max_rank = max(S.numel() for _, _, S, _ in svds)
    rows = []
    for k in tqdm([0] + [k for k in ks if 0 < k < max_rank] + [max_rank],
                  desc=f"truncate {run_dir.name}", disable=not progress, file=sys.stderr,
                  leave=False):
        set_rank(slots, w0, svds, k)
        ev = evaluate(model, task.eval, kind=task.kind, device=device, bf16=bf16)
        rows.append({"run": run_dir.name, "method": manifest["method"], "rank": manifest.get("rank"),
                     "seed": manifest.get("seed"), "k": k, "is_full_rank": k == max_rank,
                     **{f"eval_{m}": v for m, v in ev.items()},
                     **{f"before_{m}": v for m, v in manifest["eval_before"].items()}})
    return pd.DataFrame(rows)


def _shares(g: pd.DataFrame, key: str, sign: float) -> pd.DataFrame:
    """One run's gain shares from its k = 0 row (the base model's metric when it has none)."""
    m = sign * g[f"eval_{key}"]                      # higher is better from here on
    full = float(m[g["is_full_rank"]].iloc[0])
    base = sign * float(g[f"before_{key}"].iloc[0])
    zero = float(m[g["k"] == 0].iloc[0]) if (g["k"] == 0).any() else base
    nan = float("nan")
    # no gain (or a loss) from the baseline: a share of it means nothing, so it stays undefined
    return g.assign(metric=key, gain_share=(m - zero) / (full - zero) if full > zero else nan,
                    k0_share=(zero - base) / (full - base) if full > base else nan)


def gain_shares(curve: pd.DataFrame) -> pd.DataFrame:
    """Add each k's share of the gain from the k = 0 baseline, and that baseline's own share.

    With m the metric in the direction of improvement (accuracy when the curve has it, else
    minus the loss), m_0 the k = 0 model's (linear weights at W_0, the rest fine-tuned) and
    m_base the base model's (``before_<metric>``):
    share_k = (m_k − m_0)/(m_full − m_0) and k0_share = (m_0 − m_base)/(m_full − m_base),
    the part of full fine-tuning's gain that its non-linear parameters alone make. A curve
    without a k = 0 row (older tables) takes m_0 = m_base.

    Args:
        curve: rows of ``truncation_table`` (one or more runs), with ``is_full_rank``.
    Returns:
        ``curve`` with ``metric`` (accuracy or loss), ``gain_share`` and ``k0_share``; each NaN
        for a run whose full rank did not improve on its baseline (no gain to share).
    """
    key = "accuracy" if "eval_accuracy" in curve else "loss"
    sign = 1.0 if key == "accuracy" else -1.0
    return pd.concat([_shares(g, key, sign) for _, g in curve.groupby("run", sort=False)],
                     ignore_index=True)


def functional_rank(curve: pd.DataFrame, *, shares=SHARES) -> pd.DataFrame:
    """Per run and share: the smallest k keeping that share of the gain from k = 0.

    Args:
        curve: rows of ``gain_shares``.
        shares: the shares of the gain to keep, e.g. 0.9 and 0.95.
    Returns:
        One row per run and share: ``run, method, rank, seed, share, k, k0_share, k_max``; k is
        <NA> when no k keeps the share (or the run had no gain from k = 0, so every share is
        NaN); k0_share is the k = 0 model's share of the gain over the base model; k_max the
        largest k tested (the full rank).
    """
    rows = []
    for run, g in curve.groupby("run", sort=False):
        g = g.sort_values("k")
        k0 = g["k0_share"].iloc[0] if "k0_share" in g else float("nan")
        for share in shares:
            ok = g[g["gain_share"] >= share - SHARE_TOL]
            rows.append({"run": run, "method": g["method"].iloc[0], "rank": g["rank"].iloc[0],
                         "seed": g["seed"].iloc[0], "share": share,
                         "k": int(ok["k"].iloc[0]) if len(ok) else None,
                         "k0_share": float(k0), "k_max": int(g["k"].max())})
    return pd.DataFrame(rows).astype({"k": "Int64"})


def truncate_sweep(path: str | Path, *, ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                   lora_min_rank: int | None = None, device: str = "auto",
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The truncation test on a sweep's full runs (and LoRA runs of rank ≥ ``lora_min_rank``).

    Returns:
        ``(curve, summary)``: one row per run and k (k = 0 first) with the metric and its gain
        share from k = 0; and the functional rank per run at 90% and 95% of the gain, with the
        k = 0 share and the largest k tested.
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
    cfg = read_sweep_config(path, needed_by="the truncation test")
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
