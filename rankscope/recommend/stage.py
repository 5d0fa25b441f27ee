"""``rankscope recommend``: a LoRA rank per module, its evidence, a PEFT config and a rationale.

Takes a sweep's results tables (``pipeline.stages`` makes sure they are up to date), applies
``recommend.evidence`` (the evidence, the rule, the budget allocation) and writes into the
results folder:

    recommendation.csv   one row per module: the rank, its evidence and a confidence
    lora_config.json     ``peft.LoraConfig(**json.load(f))`` accepts it
    rationale.md         a short account of the evidence and the rule (``recommend.text``)
    validate.csv         with ``--validate``: the recommended config retrained beside the
                         uniform rank nearest its parameter count (``recommend.validate``;
                         one rank on every module rarely matches it exactly, and the
                         rationale then gives both counts)
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rankscope.recommend import evidence as core
from rankscope.recommend.text import rationale, validation_text
from rankscope.errors import InputError
from rankscope.store.atomic import atomic_write_json, atomic_write_text

NEEDED = ("metrics", "modules", "spectra", "convergence")


@dataclass(frozen=True)
class Recommendation:
    """A recommendation: the per-module table, the PEFT config, its rationale, its test."""

    table: pd.DataFrame
    config: dict
    rationale: str
    budget: int | None = None
    validation: pd.DataFrame | None = None


def peft_task_type(meta: dict) -> str:
    """PEFT's task type for a run's manifest: SEQ_CLS for classification, FEATURE_EXTRACTION for
    the planted task (its student is the bare backbone), else CAUSAL_LM."""
    from rankscope.train.corpora import DISTILL

    kind = meta.get("task_kind")
    if kind == "cls":
        return "SEQ_CLS"
    if kind == DISTILL:
        return "FEATURE_EXTRACTION"
    return "CAUSAL_LM"


def alpha_settings(sets) -> tuple[str, float, str]:
    """(alpha policy, alpha, peft task type) of a sweep, from its LoRA runs' manifests.

    For the scaled policy alpha is the ratio c of α = c·r; without LoRA runs, the sweep's
    ``sweep.yaml`` defaults (scaled, 2) apply.
    """
    from rankscope.train.config import SweepConfig

    meta = [s.meta for s in sets]
    task = peft_task_type(meta[0])
    for m in meta:
        if m.get("method") == "lora" and m.get("alpha_policy"):
            a = float(m["lora_alpha"])
            return m["alpha_policy"], a / m["rank"] if m["alpha_policy"] == "scaled" else a, task
    d = SweepConfig()
    return d.alpha_policy, d.alpha, task


def recommend_frames(frames: dict[str, pd.DataFrame], *, budget: int | None = None,
                     targets: tuple[str, ...] | None = None, alpha_policy: str = "scaled",
                     alpha: float = 2.0, task_type: str = "CAUSAL_LM") -> Recommendation:
    """The recommendation from results tables alone (pure: no file is read or written).

    Args:
        frames: tables of ``results.load_tables`` (modules needed; metrics, convergence,
            truncation_summary and spectra used when present, spectra needed with a budget).
        budget: trainable LoRA parameters to allocate by the measured spectra, or None for
            the evidence's ranks.
    Raises:
        InputError: missing tables, no evidence, or a budget below one rank-1 adapter.
    """
    table, glob = core.evidence_table(frames, targets=targets)
    if budget is not None:
        if frames.get("spectra") is None:
            raise InputError("a budget needs spectra.csv: run `rankscope compare` first")
        sig = core.module_spectra(frames["spectra"], table["name"])
        shapes = {n: (o, i) for n, o, i in zip(table["name"], table["d_out"], table["d_in"])}
        ranks = core.allocate({n: sig[n] for n in table["name"] if n in sig}, shapes, budget)
        table = table.assign(r_evidence=table["r"], r=table["name"].map(ranks).fillna(0).astype(int))
        table["reason"] = table["reason"] + "; budget allocation: r = " + table["r"].astype(str)
        table["params"] = table["r"] * (table["d_out"] + table["d_in"])
    kinds = dict(zip(table["name"], table["module"]))
    config = lora_config(dict(zip(table["name"], table["r"])), kinds, alpha_policy=alpha_policy,
                              alpha=alpha, task_type=task_type)
    return Recommendation(table, config, rationale(table, config, glob, budget=budget), budget)


def lora_config(ranks: dict[str, int], kinds: dict[str, str], *, alpha_policy: str, alpha: float,
                task_type: str = "CAUSAL_LM") -> dict:
    """A ``peft.LoraConfig(**config)`` dict: r, lora_alpha, target_modules, rank_pattern, …

    r is the most common rank (ties: the larger); rank_pattern and alpha_pattern name only
    the modules that differ, by their full path (peft matches a key on a dot boundary).
    target_modules lists a module kind when every module of that kind has a rank, else the
    full paths. α follows the sweep's policy: scaled α = alpha·r, fixed and rslora α = alpha.
    """
    on = {n: r for n, r in ranks.items() if r > 0}
    if not on:
        raise InputError("no module received a rank")
    counts = Counter(on.values())
    r0 = max(counts, key=lambda r: (counts[r], r))
    targets = []
    for kind in dict.fromkeys(kinds[n] for n in ranks):
        names = [n for n in ranks if kinds[n] == kind]
        targets += [kind] if all(n in on for n in names) else [n for n in names if n in on]

    def a(r):
        v = alpha * r if alpha_policy == "scaled" else alpha
        return int(v) if float(v).is_integer() else float(v)

    pattern = {n: r for n, r in on.items() if r != r0}
    cfg = {"r": r0, "lora_alpha": a(r0), "target_modules": targets, "rank_pattern": pattern,
           "alpha_pattern": {n: a(r) for n, r in pattern.items()} if alpha_policy == "scaled" else {},
           "lora_dropout": 0.0, "bias": "none", "task_type": task_type}
    if alpha_policy == "rslora":
        cfg["use_rslora"] = True
    return cfg


def uniform_rank(table: pd.DataFrame, params: int) -> int:
    """The uniform rank over the table's modules whose parameter count is nearest ``params``."""
    per_rank = int((table["d_out"] + table["d_in"]).sum())
    return max(1, int(round(params / per_rank)))


def write_recommendation(rec: Recommendation, out: Path, *, runs: str | Path) -> None:
    """recommendation.csv (recorded in the results manifest), lora_config.json, rationale.md."""
    from rankscope.store.results import save_tables

    save_tables(out, {"recommendation": rec.table}, inputs={"runs": str(runs)})
    atomic_write_json(out / "lora_config.json", rec.config)
    atomic_write_text(out / "rationale.md", rec.rationale)


def check_budget(sets, budget, *, targets: tuple[str, ...] | None = None) -> int | None:
    """The budget as a parameter count, checked against the cheapest rank-1 adapter.

    Raises:
        InputError: a budget that is not a count, or smaller than one rank-1 adapter of the
            modules the recommendation would rank.
    """
    if budget is None:
        return None
    budget = core.parse_budget(budget)
    lora = [s for s in sets if s.method == "lora"]
    pool = lora[0] if lora and targets is None else next(
        (s for s in sets if s.method == "full"), sets[0])
    cheapest = min(d.d_out + d.d_in for d in pool)
    if budget < cheapest:
        raise InputError(f"budget {budget:,} parameters is smaller than one rank-1 adapter "
                         f"({cheapest:,} parameters)")
    return budget


def recommend(runs: str | Path, sets, frames: dict[str, pd.DataFrame], out: str | Path, *,
              budget: int | None = None,
              targets: tuple[str, ...] | None = None) -> Recommendation:
    """Recommend ranks from a sweep's tables and write them into the results folder ``out``.

    Args:
        runs: the sweep folder (recorded in the results manifest).
        sets: the runs' DeltaSets (``recommend.inputs.check_runs``); frames: the results tables.
        budget: trainable LoRA parameters (``check_budget``), or None.
        targets: module kinds or names, or ``("all-linear",)``; default: the LoRA targets.
    Raises:
        InputError: see ``recommend_frames``.
    """
    policy, alpha, task_type = alpha_settings(sets)
    rec = recommend_frames(frames, budget=budget, targets=targets, alpha_policy=policy,
                           alpha=alpha, task_type=task_type)
    write_recommendation(rec, Path(out), runs=runs)
    return rec


def validation_configs(rec: Recommendation, sets) -> dict[str, dict]:
    """The recommended config and the uniform rank nearest its parameter count, by label."""
    policy, alpha, task_type = alpha_settings(sets)
    on = rec.table[rec.table["r"] > 0]
    u = uniform_rank(on, int(on["params"].sum()))
    uniform = lora_config(dict.fromkeys(on["name"], u), dict(zip(on["name"], on["module"])),
                          alpha_policy=policy, alpha=alpha, task_type=task_type)
    return {"recommended": rec.config, "uniform": uniform}


def with_validation(rec: Recommendation, val: pd.DataFrame, out: str | Path) -> Recommendation:
    """The recommendation with its validation table, its rationale rewritten to say so."""
    rec = Recommendation(rec.table, rec.config, rec.rationale + "\n" + validation_text(val),
                         rec.budget, val)
    atomic_write_text(Path(out) / "rationale.md", rec.rationale)
    return rec
