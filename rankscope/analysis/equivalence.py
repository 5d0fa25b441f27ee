"""Equivalence by interval: is LoRA at rank r as good as full fine-tuning, within a margin?

Two one-sided tests (TOST) on a paired bootstrap interval (docs/science.md, "Equivalence by
interval"). For each rank, d[s, i] = m_LoRA[s, i] − m_full[s, i] is the difference of one
held-out example's metric (its loss, or 1/0 for a correct class) between the two methods
trained with the same seed s. The bootstrap resamples seeds and examples (each with
replacement) and takes the mean of d; the 90% percentile interval [lo, hi] of that mean is two
one-sided tests at 5%. With a margin δ fixed before the runs:

* **equivalent** — the whole interval lies inside (−δ, +δ), and the TOST p-value (the larger of
  the bootstrap shares at or beyond −δ and +δ) survives Holm's correction over the ranks scanned;
* **better** / **worse** — the whole interval lies beyond the margin on one side (LoRA better
  or worse than full fine-tuning by more than δ);
* **inconclusive** — anything else: the interval is too wide to tell. Its half-width is the
  smallest margin this data could show equivalence for (``detectable``), and ``n_needed`` the
  held-out examples that would narrow it to δ at the same noise (the half-width falls as 1/√n).

Pure: arrays and DataFrames in, a DataFrame out. The per-example numbers come from each run's
manifest (``heldout_after``, tabled by ``compare.example_table``).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

LEVEL = 0.90            # two one-sided tests at 5% each
ALPHA = 0.05
N_BOOT = 4000
STATUSES = ("equivalent", "better", "worse", "inconclusive")


def paired_bootstrap(diff: np.ndarray, *, n_boot: int = N_BOOT,
                     seed: int = 0) -> np.ndarray:
    """Bootstrap means of a (seeds, examples) array of paired differences.

    Each draw resamples the seeds and, independently, the examples (with replacement), and
    averages d over the drawn cells.

    Args:
        diff: (S, N) paired differences, S ≥ 1 seeds, N ≥ 1 examples.
    Returns:
        (n_boot,) bootstrap means.
    Raises:
        ValueError: an empty array or a non-finite difference.
    """
    diff = np.asarray(diff, dtype=float)
    if diff.ndim != 2 or 0 in diff.shape:
        raise ValueError(f"expected a (seeds, examples) array of differences, got shape {diff.shape}")
    if not np.isfinite(diff).all():
        raise ValueError("a paired difference is not finite")
    s, n = diff.shape
    rng = np.random.default_rng(seed)
    seeds = rng.multinomial(s, np.full(s, 1 / s), size=n_boot)        # (B, S) counts
    examples = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)     # (B, N) counts
    return ((seeds @ diff) * examples).sum(1) / (s * n)


def tost(boot: np.ndarray, margin: float) -> tuple[float, float, float]:
    """The 90% percentile interval of bootstrap means and the TOST p-value against ±margin.

    Returns:
        (lo, hi, p): p = max(P*(mean ≤ −margin), P*(mean ≥ +margin)), each share counted as
        (k + 1)/(B + 1) so that it is never 0.
    """
    lo, hi = np.quantile(boot, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    b = len(boot)
    p = max((np.sum(boot <= -margin) + 1) / (b + 1), (np.sum(boot >= margin) + 1) / (b + 1))
    return float(lo), float(hi), float(p)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (each ≤ 1; monotone in the sorted order)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[i]))
        adjusted[i] = running
    return adjusted


def status_of(lo: float, hi: float, margin: float, p_holm: float, *, higher: bool) -> str:
    """equivalent, better, worse or inconclusive for an interval of (LoRA − full)."""
    if -margin < lo and hi < margin and p_holm <= ALPHA:
        return "equivalent"
    good_lo, good_hi = (lo, hi) if higher else (-hi, -lo)   # oriented: positive = LoRA better
    if good_lo >= margin:
        return "better"
    if good_hi <= -margin:
        return "worse"
    return "inconclusive"


def paired_differences(examples: pd.DataFrame, col: str, rank: int,
                       reference: pd.DataFrame) -> np.ndarray:
    """(seeds, examples) differences of one LoRA rank from ``reference`` (the full runs).

    Seeds both methods trained are paired seed by seed; when they share none, each LoRA seed is
    compared with the reference's mean over its seeds, example by example.
    """
    lora = examples[(examples["method"] == "lora") & (examples["rank"] == rank)]
    mine = lora.pivot_table(index="seed", columns="example", values=col)
    ref = reference.pivot_table(index="seed", columns="example", values=col)
    cols = mine.columns.intersection(ref.columns)
    common = mine.index.intersection(ref.index)
    if len(common):
        return mine.loc[common, cols].to_numpy() - ref.loc[common, cols].to_numpy()
    return mine[cols].to_numpy() - ref[cols].mean(0).to_numpy()[None, :]


def equivalence_scan(examples: pd.DataFrame, *, metric: str, higher: bool, margin: float,
                     n_boot: int = N_BOOT, seed: int = 0,
                     reference: pd.DataFrame | None = None) -> pd.DataFrame:
    """The equivalence test of every LoRA rank against full fine-tuning (or ``reference``).

    Args:
        examples: one row per run and held-out example: ``method, rank, seed, example`` and the
            metric's column (``loss`` or ``correct``; ``compare.example_table``).
        metric: the column compared; higher: whether higher is better (correct: yes).
        margin: δ in the metric's units, fixed before the runs.
        reference: the rows compared against (default: the full runs of ``examples``).
    Returns:
        One row per rank: ``rank, n_seeds, n_examples, metric, lora, reference, diff, lo, hi,
        margin, p_tost, p_holm, status, detectable, n_needed`` (diff = LoRA − reference; lo, hi
        its 90% interval; empty when there is no reference or no LoRA run).
    Raises:
        ValueError: a margin that is not a finite positive number.
    """
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"the equivalence margin must be a finite positive number, got {margin}")
    ref = examples[examples["method"] == "full"] if reference is None else reference
    ranks = sorted(int(r) for r in examples.loc[examples["method"] == "lora", "rank"].dropna().unique())
    rows = []
    for r in ranks if len(ref) else []:
        diff = paired_differences(examples, metric, r, ref)
        boot = paired_bootstrap(diff, n_boot=n_boot, seed=seed + r)
        lo, hi, p = tost(boot, margin)
        d = float(diff.mean())
        half = max(hi - d, d - lo)
        mine = examples[(examples["method"] == "lora") & (examples["rank"] == r)]
        rows.append({"rank": r, "n_seeds": diff.shape[0], "n_examples": diff.shape[1],
                     "metric": metric, "lora": float(mine[metric].mean()),
                     "reference": float(ref[metric].mean()), "diff": d, "lo": lo, "hi": hi,
                     "margin": margin, "p_tost": p, "detectable": half,
                     "n_needed": int(math.ceil(diff.shape[1] * (half / margin) ** 2))})
    out = pd.DataFrame(rows, columns=["rank", "n_seeds", "n_examples", "metric", "lora",
                                      "reference", "diff", "lo", "hi", "margin", "p_tost",
                                      "detectable", "n_needed"])
    out["p_holm"] = holm(out["p_tost"]) if len(out) else []
    out["status"] = [status_of(r.lo, r.hi, margin, r.p_holm, higher=higher)
                     for r in out.itertuples()]
    return out


def against_rank(examples: pd.DataFrame, rank: int, *, metric: str, higher: bool,
                 margin: float) -> pd.DataFrame:
    """``equivalence_scan`` of every other LoRA rank against LoRA at ``rank`` (the smallest, to
    find a rank that trained worse; the largest, to ask whether a curve is flat)."""
    lora = examples[examples["method"] == "lora"]
    return equivalence_scan(lora[lora["rank"] != rank], metric=metric, higher=higher,
                            margin=margin, reference=lora[lora["rank"] == rank])


def smallest_equivalent(scan: pd.DataFrame, *, better_counts: bool) -> int | None:
    """The smallest rank that is equivalent (or better, where ``better_counts``), else None."""
    ok = scan["status"].eq("equivalent") | (better_counts & scan["status"].eq("better"))
    return int(scan.loc[ok, "rank"].min()) if ok.any() else None
