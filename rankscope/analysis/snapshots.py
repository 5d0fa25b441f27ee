"""The energy rank of an update against the training tokens behind it (Biderman et al.).

A sweep trained with ``snapshots`` keeps each run's update at shares of its steps
(``store.runs.snapshot_files``); with the run's final update these trace k₉₀ of ΔW as
training goes on, for full fine-tuning (Biderman et al.: its rank grows with training, to
10–100× a typical LoRA rank) and for LoRA (at most r). Each k₉₀ sits beside the k₉₀ of a
Gaussian matrix of the module's shape (``floors.noise_rank_90``): an update at that floor has
no more structure than noise.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from rankscope.analysis.decompose import update_svd
from rankscope.analysis.deltas import run_deltas
from rankscope.analysis.floors import noise_rank_90
from rankscope.analysis.tables import nullable_ints
from rankscope.linalg.spectra import rank_at_energy, svd_device
from rankscope.store.runs import UPDATES, TensorFile, find_runs, read_manifest, snapshot_files

COLUMNS = ["run", "method", "rank", "seed", "name", "layer", "module", "step", "share",
           "tokens", "k90", "fro", "noise_k90"]


def snapshot_table(path: str | Path, *, device: str = "auto") -> pd.DataFrame:
    """k₉₀ and ‖ΔW‖_F of every module of every run that kept snapshots, at each snapshot and at
    its last step.

    Args:
        path: a sweep folder (or one run folder).
        device: where dense SVDs run ("auto": CUDA when present).
    Returns:
        One row per run, step and module (``COLUMNS``): ``share`` = step / steps, ``tokens`` =
        step × tokens per step (batch × accumulation × max_len), ``noise_k90`` the Gaussian
        floor of the module's shape. Empty (with the columns) when no run kept snapshots.

    Raises:
        InputError: a snapshot file that is corrupt, truncated or holds NaN/Inf.
    """
    dev = svd_device(device)
    rows = []
    for run_dir in find_runs(path):
        snaps = snapshot_files(run_dir)
        if not snaps:
            continue
        m = read_manifest(run_dir)
        steps, per_step = int(m["steps"]), int(m["tokens_per_step"])
        for step, file in {**snaps, steps: run_dir / UPDATES}.items():
            for d in run_deltas(TensorFile(file), m["method"], file):
                S = update_svd(d, compute_uv=False, device=dev).double()
                rows.append({"run": run_dir.name, "method": m["method"], "rank": m.get("rank"),
                             "seed": m.get("seed"), "name": d.name, "layer": d.layer,
                             "module": d.module, "step": step, "share": step / steps,
                             "tokens": step * per_step, "k90": rank_at_energy(S, 0.9),
                             "fro": float(S.norm()),
                             "noise_k90": noise_rank_90((d.d_out, d.d_in))})
    return nullable_ints(pd.DataFrame(rows, columns=COLUMNS), ("rank", "seed", "layer"))
