"""The φ(i, j) heatmaps of Hu et al. Figures 3 and 4: subspace similarity between the updates
of two ranks (one seed) and of two seeds (the top rank), from the ``subspace_grid`` table.
"""
from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from rankscope.errors import InputError
from rankscope.outputs.figure_tables import mid_layer, need_table, one_sweep, panels


SPACES = {"left": ("B", "column space (B)"), "right": ("A", "row space (A)")}
MOVED = 0.5         # below this ‖A − A₀‖/‖A₀‖, A's row space is still mostly its random init
DIAG = 16           # the seeds' block test: mean φ(i, i) over i ≤ 16 (Hu et al. Fig. 4's corner)
NULL_DRAWS = 200    # seeded Haar draws behind that statistic's null quantile


def _grids(results, pair: str, *, side: str, layer: int | None, modules):
    """The φ(i, j) grids of ``pair`` on ``side`` at every layer the grid table holds.

    Returns:
        (rows, modules, layers): ``layers`` starts with the one drawn in full (``layer``, or
        the middle one), then the others in order.
    """
    g = need_table(one_sweep(results), "subspace_grid", "a φ(i, j) heatmap")
    g = g[(g["pair"] == pair) & (g["side"] == side)]
    if "basis" in g:        # one trained basis per side (A, not A − A₀, on the row space)
        g = g[g["basis"].isin([SPACES[side][0], "random"]) | (g["source"] != "trained")]
    if g.empty:
        raise InputError(f"no φ(i, j) grid for a pair of {pair} on the {side} side: the sweep "
                         f"needs {'two ranks' if pair == 'ranks' else 'two seeds at its top rank'}")
    first = mid_layer(g, layer)
    layers = [first] + sorted(int(x) for x in g["layer"].dropna().unique() if int(x) != first)
    modules = list(modules or dict.fromkeys(g.loc[g["layer"] == first, "module"]))
    cols = [c for c in ("module", "name", "layer", "side", "source", "rank_1", "rank_2",
                        "seed_1", "seed_2", "i", "j", "phi", "null_q99", "a_moved") if c in g]
    return g[cols], modules, layers


def _evidence(gm: pd.DataFrame, side: str) -> str:
    """The panel's evidence: φ(1, 1) against its null's 99% quantile, and how far A moved."""
    top = gm[(gm["i"] == 1) & (gm["j"] == 1)]
    text = f"φ(1,1) = {top['phi'].iloc[0]:.2f}" if len(top) else ""
    if len(top) and "null_q99" in top and pd.notna(top["null_q99"].iloc[0]):
        text += f", null 99%: {top['null_q99'].iloc[0]:.3f}"
    moved = gm["a_moved"].dropna() if "a_moved" in gm else pd.Series(dtype=float)
    if side == "right" and len(moved):
        a = float(moved.min())
        text += f"; A moved {a:.2f}" + (" — not moved: φ reads A's init" if a < MOVED else "")
    return text


def subspace_ranks(results, *, sides=("left", "right"), layer: int | None = None,
                   modules: list[str] | None = None, zoom: int = 8, side: str | None = None,
                   layers: list[int] | None = None) -> pd.DataFrame:
    """Hu et al. Figure 3: φ(ΔW_{r1}, ΔW_{r2}, i, j) of one seed on the column space (B) and the
    row space (A), whole and zoomed (i, j ≤ zoom); each title carries φ(1, 1), its null's 99%
    quantile and, on the row space, how far A moved from its initialisation. Every other layer
    of the grid table gets a whole panel too, so that φ(1, 1) is read over layers; ``view``
    ("whole" or "zoom") tells the zoomed copies of the first layer's cells apart. The first
    seed's pair is drawn at every layer; each other seed's at the first layer, so that φ(1, 1)
    is read per seed too. ``side`` (one side only) is kept for experiment files that name it;
    ``layers`` are the layers ``compare`` computed grids at (``pipeline.figures``)."""
    out = []
    for sd in ((side,) if side else sides):
        g, mods, at = _grids(results, "ranks", side=sd, layer=layer, modules=modules)
        g = g[g["source"] == "trained"]
        seeds = sorted(g["seed_1"].dropna().unique()) if "seed_1" in g else [None]
        cells = [(at[0], s) for s in seeds[:1]] + [(lay, seeds[0]) for lay in at[1:]] + \
            [(at[0], s) for s in seeds[1:]]
        for m in mods:
            for lay, seed in cells:
                gm = g[(g["module"] == m) & (g["layer"] == lay)]
                gm = gm[gm["seed_1"] == seed] if seed is not None else gm
                if gm.empty:
                    continue
                r1, r2 = int(gm["rank_1"].iloc[0]), int(gm["rank_2"].iloc[0])
                where = f"{SPACES[sd][1]} of ΔW {m}, layer {lay}" + \
                    (f", seed {int(seed)}" if seed is not None and len(seeds) > 1 else "")
                out.append(gm.assign(plot="subspace_heatmap", view="whole", panel=(
                    f"{where}: r = {r1} vs {r2}\n{_evidence(gm, sd)}")))
                if (lay, seed) == cells[0]:
                    z = min(zoom, r1)
                    out.append(gm[(gm["i"] <= z) & (gm["j"] <= z)].assign(
                        plot="subspace_heatmap", view="zoom", panel=f"{where}: i, j ≤ {z}"))
    return panels(out)


def _shapes(results) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each module name, from the modules table (empty without one)."""
    mods = one_sweep(results).get("modules")
    if mods is None or mods.empty or not {"name", "d_out", "d_in"} <= set(mods):
        return {}
    first = mods.drop_duplicates("name")
    return {n: (int(o), int(i)) for n, o, i in zip(first["name"], first["d_out"], first["d_in"])}


@functools.lru_cache(maxsize=None)
def diag_null_q99(n: int, k: int, n_draws: int = NULL_DRAWS) -> float:
    """The 99% quantile of mean_{i ≤ k} φ(i, i) between two independent Haar k-frames of R^n.

    φ(i, i) = ‖X_iᵀ Y_i‖_F² / i on the top-i columns (Hu et al. eq. 4); the mean over the
    diagonal is one statistic, so its null is drawn whole (``n_draws`` seeded draws), not
    assembled from the cells' own quantiles.
    """
    import torch

    from rankscope.linalg.subspace import random_orthonormal

    gen = torch.Generator().manual_seed(1_000_003 * n + k)
    stats = np.empty(n_draws)
    for t in range(n_draws):
        x, y = (random_orthonormal(n, k, generator=gen) for _ in range(2))     # (n, k) each
        cum = (x.T @ y).square().numpy().cumsum(axis=0).cumsum(axis=1)        # (k, k)
        stats[t] = float(np.mean(np.diag(cum) / np.arange(1, k + 1)))
    return float(np.quantile(stats, 0.99))


def _diag_block(gm: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """``gm`` (one grid) with ``diag_phi`` = mean_{i ≤ k} φ(i, i), k = ``diag_k`` =
    min(DIAG, its sizes), and ``diag_null_q99`` (NaN when n, the dimension compared, is unknown)."""
    k = int(min(DIAG, gm["i"].max(), gm["j"].max()))
    diag = gm[(gm["i"] == gm["j"]) & (gm["i"] <= k)]["phi"]
    null = diag_null_q99(n, k) if n else np.nan
    return gm.assign(diag_k=k, diag_phi=float(diag.mean()), diag_null_q99=null)


def subspace_seeds(results, *, sides=("left", "right"), layer: int | None = None,
                   modules: list[str] | None = None, side: str | None = None,
                   layers: list[int] | None = None) -> pd.DataFrame:
    """Hu et al. Figure 4: φ(i, j) between two seeds at the top rank on both spaces (titles as
    in ``subspace_ranks``, one panel per layer of the grid table), and two random subspaces of
    the same sizes. Every row carries its grid's block statistic (``_diag_block``): the mean
    φ(i, i) over the top-16 diagonal and its null's 99% quantile, n = d_out on the column
    space and d_in on the row space."""
    rows, shapes = [], _shapes(results)
    for sd in ((side,) if side else sides):
        g, mods, layers = _grids(results, "seeds", side=sd, layer=layer, modules=modules)
        for m in mods:
            for lay in layers:
                gm = g[(g["module"] == m) & (g["source"] == "trained") & (g["layer"] == lay)]
                if gm.empty:
                    continue
                s1, s2 = int(gm["seed_1"].iloc[0]), int(gm["seed_2"].iloc[0])
                r = int(gm["rank_1"].iloc[0])
                gm = _diag_block(gm, _dim(shapes, gm, sd))
                block = (f"mean φ(i,i), i ≤ {gm['diag_k'].iloc[0]} = {gm['diag_phi'].iloc[0]:.3f}"
                         f", null 99%: {gm['diag_null_q99'].iloc[0]:.3f}")
                rows.append(gm.assign(plot="subspace_heatmap", panel=(
                    f"{SPACES[sd][1]} of ΔW {m}, layer {lay}: seeds {s1} vs {s2}, r = {r}\n"
                    f"{_evidence(gm, sd)}\n{block}")))
    rnd = g[(g["module"] == mods[0]) & (g["source"] == "random") & (g["layer"] == layers[0])]
    rows.append(_diag_block(rnd, _dim(shapes, rnd, sd)).assign(
        plot="subspace_heatmap", panel="two random subspaces, same sizes"))
    df = panels(rows)
    # without the modules' shapes there is no null: no column, so a check of it reads "no data"
    return df.drop(columns="diag_null_q99") if df["diag_null_q99"].isna().all() else df


def _dim(shapes: dict, gm: pd.DataFrame, side: str) -> int | None:
    """The dimension φ compares on ``side``: d_out (column space) or d_in (row space)."""
    shape = shapes.get(gm["name"].iloc[0]) if "name" in gm and len(gm) else None
    return None if shape is None else shape[0 if side == "left" else 1]
