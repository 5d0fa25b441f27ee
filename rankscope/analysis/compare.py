"""Every analysis of a sweep but the truncation test, as one dict of tidy tables.

``compare_frames`` decomposes each update once (``decompose.decompose_sweep``) and W_0 once per
module, then builds the spectra (``tables``), the subspace similarities and convergence
(``similarity``), ΔW vs W and intruders (``relation``) and each run's metrics from those.
Definitions: docs/science.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rankscope.analysis.decompose import RunDecomp, base_svds, base_weights, decompose_sweep
from rankscope.analysis.deltas import from_runs
from rankscope.analysis.floors import seed_diff_ranks
from rankscope.linalg.spectra import svd_device
from rankscope.analysis.relation import intruders, relation_to_w
from rankscope.analysis.similarity import (convergence_table, require_layers, subspace_grids,
                                           subspace_similarity)
from rankscope.analysis.tables import add_seed_diff, decomposed_spectra, nullable_ints


def _median(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def training_evidence(manifest: dict) -> dict:
    """What a run's manifest says about its training (docs/science.md, "Training evidence").

    late_gain_share: the share of the held-out gain made in the last fifth of the learning-rate
    schedule (None for a manifest without ``late_step``: it split at 80% of the *steps*, which
    under a cosine schedule passes any run);
    a_moved_min / a_moved_median: over LoRA modules, ‖A − A₀‖_F/‖A₀‖_F (below ~0.5, A's row
    space is still mostly its initialisation); delta_fro_median: the median ‖ΔW‖_F over
    modules; full_scope: which parameters full fine-tuning trained ("all", "linear" or
    "targets"); lr: the peak rate, and lr_searched: whether the learning-rate search chose it;
    late_train_rise: the training loss's relative rise over the last fifth of the steps
    (``train.evidence.late_train_rise``); equivalence_metric / equivalence_margin: the
    equivalence test's metric and margin δ, fixed in the sweep's config before its runs.
    Each is None when the manifest lacks it (runs older than these fields).
    """
    moved = (manifest.get("a_moved") or {}).values()
    late = manifest.get("late_gain_share") if "late_step" in manifest else None
    return {"late_gain_share": late,
            "a_moved_min": min((float(v) for v in moved if v is not None), default=None),
            "a_moved_median": _median(moved),
            "delta_fro_median": _median((manifest.get("delta_fro") or {}).values()),
            "full_scope": manifest.get("full_scope"), "lr": manifest.get("lr"),
            "lr_searched": manifest.get("lr_searched"),
            "late_train_rise": manifest.get("late_train_rise"),
            "equivalence_metric": manifest.get("equivalence_metric"),
            "equivalence_margin": manifest.get("equivalence_margin")}


def run_metrics(runs: list[RunDecomp]) -> pd.DataFrame:
    """Each run's held-out metrics before and after training, and its training evidence.

    Returns:
        One row per run: ``run, method, rank, seed``, ``before_<metric>…``, ``after_<metric>…``,
        ``trainable_params, steps, wall_time_s`` and the columns of ``training_evidence``
        (empty for runs whose manifest predates them).
    """
    rows = []
    for r in runs:
        m = r.manifest
        rows.append({"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed,
                     **{f"before_{k}": v for k, v in m.get("eval_before", {}).items()},
                     **{f"after_{k}": v for k, v in m.get("eval_after", {}).items()},
                     "trainable_params": m.get("trainable_params"), "steps": m.get("steps"),
                     "wall_time_s": m.get("wall_time_s"), **training_evidence(m)})
    df = nullable_ints(pd.DataFrame(rows), ("rank", "seed"))
    for c in ("late_gain_share", "a_moved_min", "a_moved_median", "delta_fro_median",
              "late_train_rise", "equivalence_margin"):
        df[c] = df[c].astype(float)      # None → NaN, also when every run lacks the field
    return df.sort_values(["method", "rank", "seed"], na_position="first", ignore_index=True)


EXAMPLE_COLUMNS = ["run", "method", "rank", "seed", "example", "loss", "correct"]


def example_table(runs: list[RunDecomp]) -> pd.DataFrame:
    """Each run's held-out examples, one row per run and example: the numbers the equivalence
    test pairs (``analysis.equivalence``). The base model's come first, as method ``base``
    (from the first run that recorded them).

    Returns:
        ``run, method, rank, seed, example, loss, correct`` (correct: 1.0/0.0 for
        classification, NaN otherwise); no rows for runs whose manifest predates them.
    """
    frames, base = [], None
    for r in runs:
        ids = {"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed}
        for key, who in (("heldout_before", "base"), ("heldout_after", "run")):
            got = r.manifest.get(key) or {}
            if not got.get("loss") or (who == "base" and base is not None):
                continue
            n = len(got["loss"])
            row = {"run": "base", "method": "base", "rank": None, "seed": None} \
                if who == "base" else ids
            frames.append(pd.DataFrame({**row, "example": np.arange(n), "loss": got["loss"],
                                        "correct": got.get("correct", [np.nan] * n)}))
            base = True if who == "base" else base
    if not frames:
        return pd.DataFrame(columns=EXAMPLE_COLUMNS)
    return nullable_ints(pd.concat(frames, ignore_index=True)[EXAMPLE_COLUMNS], ("rank", "seed"))


def compare_frames(path: str | Path, *, grid_layers: list[int] | None = None,
                   n_draws: int = 200, device: str = "auto",
                   progress: bool = False) -> dict[str, pd.DataFrame]:
    """Every analysis of a sweep but the truncation test, as {table name: DataFrame}.

    Each update is decomposed once (``decompose_sweep``: factorized SVDs for LoRA, one dense SVD
    per full-run module, svdvals for the full runs' other modules), and W_0 once per module
    (``base_svds``); every table reuses those. The modules table's seed-disagreement floor
    (``floors.seed_diff_ranks``) reads the full runs of two seeds once more, side by side.
    Dense SVDs of updates run on ``device`` ("auto": CUDA when present; "cpu"; "cuda").

    Raises:
        InputError: no finished runs, mixed setups, unknown grid layers, or "cuda" without CUDA.
    """
    if grid_layers:     # refused before any SVD, from the names of one LoRA run's modules
        lora = [s for s in from_runs(path) if s.method == "lora"]
        if lora:
            require_layers(grid_layers, sorted({d.layer for d in lora[0] if d.layer is not None}))
    svd_device(device)                 # "cuda" without CUDA: refused before any work
    runs = decompose_sweep(path, keep=None, spectra=True, device=device, progress=progress)
    weights = base_weights(runs)
    svds = base_svds(weights)
    spectra, modules = decomposed_spectra(runs)
    modules = add_seed_diff(modules, seed_diff_ranks(from_runs(path), device=device))
    return {"metrics": run_metrics(runs), "examples": example_table(runs),
            "modules": modules, "spectra": spectra,
            "subspace": subspace_similarity(runs, n_draws=n_draws),
            "subspace_grid": subspace_grids(runs, layers=grid_layers),
            "convergence": convergence_table(runs),
            "relation": relation_to_w(runs, weights, svds=svds, n_draws=n_draws),
            "intruders": intruders(runs, weights, svds=svds)}
