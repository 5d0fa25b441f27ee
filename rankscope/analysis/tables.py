"""Tidy tables of spectra: identifying columns first, one row per singular value or module."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from rankscope.analysis.floors import noise_rank_90
from rankscope.errors import InputError
from rankscope.linalg.spectra import gd_rank, spectrum_metrics

ID_COLS = ["run", "method", "rank", "seed", "layer", "module", "name"]
ID_INTS = ("rank", "seed", "layer")   # identifying columns that may be empty: nullable ints
METRIC_COLS = ["fro_norm", "spectral_norm", "stable_rank", "entropy_rank", "energy_rank_50",
               "energy_rank_90", "energy_rank_99", "numerical_rank"]
# how many singular values the measures saw: empty for the whole spectrum, K for a top-K SVD
# (``topk.topk_svdvals``), where an empty energy rank means "> K" (``censored_median``)
SVD_COL = "svd_topk"
# k₉₀'s noise floors (``floors``): a Gaussian matrix of the shape, the seeds' disagreement
# ΔW_seed a − ΔW_seed b (full runs of a sweep with ≥ 2 seeds, else empty), and the Gavish–Donoho rank
FLOOR_COLS = ["energy_rank_90_noise", "energy_rank_90_seeddiff", "gd_rank"]


def nullable_ints(df: pd.DataFrame, cols) -> pd.DataFrame:
    """``df`` with each of ``cols`` it has as a nullable integer (empty for a full update's rank,
    a run without seed, a module outside the blocks)."""
    for c in cols:
        if c in df:
            df[c] = df[c].astype("Int64")
    return df


def add_module_rows(spectra: list, modules: list[dict], ids: dict, s: torch.Tensor, *,
                    shape: tuple[int, int], fro: float | None = None) -> None:
    """Append one module's rows: its singular values to ``spectra``, its measures to ``modules``.

    The measures are ``spectrum_metrics``, the k₉₀ of a Gaussian matrix of the same shape and
    the Gavish–Donoho rank; ``energy_rank_90_seeddiff`` is left empty (``add_seed_diff``).
    With ``fro``, ``s`` may be the top K values only (``SVD_COL`` = K): the measures that
    need the whole spectrum (entropy and Gavish–Donoho ranks) are left empty.

    Args:
        ids: the ``ID_COLS`` values of the module.
        s: (m,) its singular values, descending (the top K of them with ``fro``).
        shape: (d_out, d_in).
        fro: ‖ΔW‖_F over the whole spectrum, when ``s`` is not all of it.
    """
    partial = fro is not None and len(s) < min(shape)
    modules.append({**ids, "d_out": shape[0], "d_in": shape[1],
                    **spectrum_metrics(s, shape=shape, fro=fro if partial else None),
                    SVD_COL: len(s) if partial else None,
                    "energy_rank_90_noise": noise_rank_90(shape), "energy_rank_90_seeddiff": None,
                    "gd_rank": None if partial else gd_rank(s, shape=shape)})
    spectra.append((ids, s.detach().cpu().double().numpy()))


def spectra_frames(spectra: list, modules: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``(spectra, modules)`` DataFrames of rows made by ``add_module_rows``.

    spectra has one row per singular value (``ID_COLS`` then ``index, sigma``: ~10⁵ rows for a
    full model, so it is built column by column, not from a dict per row); modules one row per
    module (``ID_COLS``, ``d_out, d_in``, ``METRIC_COLS`` and ``FLOOR_COLS``).

    Raises:
        InputError: no rows: every ΔW was zero.
    """
    if not modules:
        raise InputError("no updated modules found: every ΔW is zero")
    counts = [len(s) for _, s in spectra]
    cols = {c: np.repeat(np.array([ids[c] for ids, _ in spectra], dtype=object), counts)
            for c in ID_COLS}
    cols["index"] = np.concatenate([np.arange(n) for n in counts])
    cols["sigma"] = np.concatenate([s for _, s in spectra])
    frame = pd.DataFrame(modules, columns=ID_COLS + ["d_out", "d_in"] + METRIC_COLS + [SVD_COL]
                         + FLOOR_COLS)
    # ranks a top-K SVD leaves empty stay integers (they are plain ints without one)
    partial = [c for c in _TOPK_EMPTIES if frame[c].isna().any()]
    return (nullable_ints(pd.DataFrame(cols, columns=ID_COLS + ["index", "sigma"]), ID_INTS),
            nullable_ints(frame, ID_INTS + (SVD_COL, "energy_rank_90_seeddiff", *partial)))


_TOPK_EMPTIES = ("energy_rank_50", "energy_rank_90", "energy_rank_99", "numerical_rank", "gd_rank")


def add_seed_diff(modules: pd.DataFrame, ranks: dict[str, int]) -> pd.DataFrame:
    """``modules`` with ``energy_rank_90_seeddiff`` filled on every full run's row of each module
    in ``ranks`` ({name: k₉₀ of ΔW_seed a − ΔW_seed b}, ``floors.seed_diff_ranks``): the same
    value on every seed's row of that module."""
    full = modules["method"] == "full"
    values = modules.loc[full, "name"].map(ranks)
    out = modules.copy()
    out["energy_rank_90_seeddiff"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out.loc[full, "energy_rank_90_seeddiff"] = values.astype("Int64")
    return out


def decomposed_spectra(runs: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``spectra_frames`` of the singular values that ``decompose_sweep(..., spectra=True)``
    already holds in each ``RunDecomp`` (no SVD here)."""
    spectra, modules = [], []
    for r in runs:
        for m in r.spectra:
            ids = {"run": r.run, "method": r.method, "rank": m.rank if r.method == "lora" else None,
                   "seed": r.seed, "layer": m.layer, "module": m.module, "name": m.name}
            add_module_rows(spectra, modules, ids, m.S, shape=(m.d_out, m.d_in))
    return spectra_frames(spectra, modules)


def censored_median(values: pd.Series, bounds: pd.Series):
    """The median of energy ranks where an empty value with a bound K means "> K" (a top-K
    SVD that did not reach the share): those count as above every measured value.

    Returns:
        The median (a float); the text "> K" (K the smallest bound) when the median is
        among the censored values; None when there are no values.
    """
    known = values.dropna().astype(float).sort_values().tolist()
    censored = bounds[values.isna() & bounds.notna()]
    n = len(known) + len(censored)
    if n == 0:
        return None
    if len(known) < n // 2 + 1:     # the upper middle value is censored: the median is too
        return f"> {int(censored.min())}"
    mid = n // 2
    return float(known[mid]) if n % 2 else (known[mid - 1] + known[mid]) / 2


def summary(modules: pd.DataFrame) -> pd.DataFrame:
    """Per run and module kind, over layers: the median of each effective-rank measure.

    Energy ranks beyond a top-K SVD count as "> K" (``censored_median``), not as missing."""
    grouped = modules.groupby(["run", "module"], sort=False)
    table = grouped.agg(layers=("name", "size"), d_out=("d_out", "first"), d_in=("d_in", "first"),
                        fro_norm=("fro_norm", "median"), stable_rank=("stable_rank", "median"),
                        entropy_rank=("entropy_rank", "median"),
                        energy_rank_90=("energy_rank_90", "median"),
                        energy_rank_99=("energy_rank_99", "median"),
                        **{c: (c, "median") for c in FLOOR_COLS
                           if c in modules and modules[c].notna().any()})   # its noise floors
    if SVD_COL in modules and modules[SVD_COL].notna().any():
        for col in ("energy_rank_90", "energy_rank_99"):
            table[col] = [censored_median(g[col], g[SVD_COL]) for _, g in grouped]
    return table.reset_index()
