"""The hypothesis tests over a sweep: subspace similarity, convergence to full, ΔW vs W, intruders.

Each function takes the decomposed runs (``decompose_sweep``) and returns one tidy DataFrame;
``compare`` runs them all and writes the CSVs. Definitions: shared/SCIENCE.md.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rankscope.analysis.decompose import (Decomp, RunDecomp, base_svds, base_weights, decompose_sweep,
                        spectra_tables, tall_svd)
from rankscope.analysis.deltas import from_runs
from rankscope.errors import InputError
from rankscope.linalg.subspace import (amplification, counts_below, energy_in_subspace, intruder_max_cos, phi,
                       phi_grid, phi_null_draws, phi_null_mean, projection_norms,
                       random_orthonormal, top_left_singular)

SIDES = {"right": "Vh", "left": "U"}   # right: row space (of A); left: column space (of B)
EPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
FACTORS, DELTA = "A/B", "ΔW"           # the two bases φ is measured in (the ``basis`` column)


def frame(d: Decomp, side: str, basis: str = DELTA) -> torch.Tensor:
    """Orthonormal columns of one side of an update, most important first.

    basis "ΔW": ΔW's singular vectors, U or Vhᵀ (any update). basis "A/B": Hu et al.'s (eq. 4),
    B's left singular vectors or A's right ones (LoRA only): same spans, other order.
    """
    if basis == FACTORS:
        return d.factor_frames[side]
    return d.U if side == "left" else d.Vh.T


def pair_basis(kind: str) -> str:
    """LoRA-vs-LoRA pairs (ranks, seeds) use A and B as Hu et al.; pairs with full use ΔW."""
    return DELTA if kind == "full" else FACTORS


def _null(n: int, i: int, j: int, cache: dict, n_draws: int = 100) -> tuple[float, float]:
    key = (n, i, j)
    if key not in cache:
        draws = phi_null_draws(n, i, j, n_draws=n_draws,
                               generator=torch.Generator().manual_seed(hash(key) % 2**31))
        cache[key] = (float(draws.mean()), float(draws.std()))
    return cache[key]


def lora_pairs(runs: list[RunDecomp]) -> list[tuple[str, RunDecomp, RunDecomp]]:
    """Pairs of LoRA runs: every two ranks with one seed, and every two seeds with one rank."""
    lora = [r for r in runs if r.method == "lora"]
    pairs = []
    for a, b in itertools.combinations(lora, 2):
        if a.seed == b.seed and a.rank != b.rank:
            pairs.append(("ranks", *sorted((a, b), key=lambda r: r.rank)))
        elif a.rank == b.rank and a.seed != b.seed:
            pairs.append(("seeds", a, b))
    return pairs


def _pair_ids(kind, a: RunDecomp, b: RunDecomp) -> dict:
    return {"pair": kind, "run_1": a.run, "run_2": b.run, "rank_1": a.rank, "rank_2": b.rank,
            "seed_1": a.seed, "seed_2": b.seed}


def subspace_similarity(runs: list[RunDecomp], *, n_draws: int = 100) -> pd.DataFrame:
    """φ of the top direction and of the top-m directions, m = min(r1, r2), for every pair.

    Pairs: LoRA ranks (same seed), LoRA seeds (same rank), both in the basis of A's right and
    B's left singular vectors (Hu et al. eq. 4), and each LoRA run against the full update of
    its seed (its top-r directions), in ΔW's singular vectors (``basis`` column). Both sides;
    with the analytic null max(i, j)/n and an empirical draw of random subspaces (mean and
    standard deviation).
    """
    full = {r.seed: r for r in runs if r.method == "full"}
    pairs = lora_pairs(runs)
    pairs += [("full", r, full.get(r.seed, next(iter(full.values()))))
              for r in runs if r.method == "lora" and full]
    rows, cache = [], {}
    for kind, a, b in pairs:
        basis = pair_basis(kind)
        for name, da in a.modules.items():
            db = b.modules.get(name)
            if db is None:
                continue
            for side in SIDES:
                ua, ub = frame(da, side, basis), frame(db, side, basis)
                m = min(x for x in (a.rank, b.rank, ua.shape[1], ub.shape[1]) if x)
                n = ua.shape[0]
                grid = phi_grid(ua, ub, imax=m, jmax=m)  # (m, m): φ(i, i) on its diagonal
                for i in sorted({1, m}):
                    mean, std = _null(n, i, i, cache, n_draws)
                    rows.append({**_pair_ids(kind, a, b), "layer": da.layer, "module": da.module,
                                 "name": name, "side": side, "basis": basis, "i": i, "j": i,
                                 "phi": float(grid[i - 1, i - 1]),
                                 "null_mean": phi_null_mean(n, i, i),
                                 "null_draw_mean": mean, "null_draw_std": std})
    return _typed(pd.DataFrame(rows), ("rank_1", "rank_2", "seed_1", "seed_2", "layer"))


def grid_pairs(runs: list[RunDecomp], *, ranks: tuple[int, int] = (8, 64)):
    """The pairs Hu et al. draw: r = 8 vs 64 of one seed (Fig. 3), two seeds at r = 64 (Fig. 4).

    Falls back to the closest ranks the sweep has: the largest rank and the one nearest
    ``ranks[0]``. The rank pair is drawn from the first seed that has both ranks, the seed pair
    from the first two seeds that have the top rank; a pair no seed completes (an unfinished
    run) is left out.
    """
    lora = [r for r in runs if r.method == "lora"]
    if not lora:
        return []
    have = sorted({r.rank for r in lora})
    hi = ranks[1] if ranks[1] in have else have[-1]
    lo = min((r for r in have if r < hi), key=lambda r: abs(r - ranks[0]), default=None)
    by = {(r.rank, r.seed): r for r in lora}
    seeds_at = {k: sorted({s for (rk, s) in by if rk == k}, key=_seed_key) for k in (lo, hi)}
    out = []
    both = [s for s in seeds_at[hi] if s in seeds_at[lo]]
    if lo is not None and both:
        out.append(("ranks", by[(lo, both[0])], by[(hi, both[0])]))
    if len(seeds_at[hi]) >= 2:
        s1, s2 = seeds_at[hi][:2]
        out.append(("seeds", by[(hi, s1)], by[(hi, s2)]))
    return out


def _seed_key(seed):
    return (seed is None, seed if seed is not None else 0)


def subspace_grids(runs: list[RunDecomp], *, layers: list[int] | None = None,
                   seed: int = 0) -> pd.DataFrame:
    """φ(i, j) grids for the figure pairs, at the chosen layers (default: the middle one).

    The trained grids use Hu et al.'s basis (A's right and B's left singular vectors, ``basis``
    "A/B"); each comes with a 'random' twin: two independent random subspaces of the same sizes.

    Raises:
        InputError: a requested layer the pairs' runs do not have (naming the ones they have).
    """
    pairs = grid_pairs(runs)
    if not pairs:
        return pd.DataFrame()
    all_layers = sorted({d.layer for d in pairs[0][1].modules.values() if d.layer is not None})
    require_layers(layers, all_layers)
    layers = layers or ([all_layers[len(all_layers) // 2]] if all_layers else [])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for kind, a, b in pairs:
        for name, da in a.modules.items():
            db = b.modules.get(name)
            if db is None or da.layer not in layers:
                continue
            for side in SIDES:
                rows += _grid_rows(kind, a, b, da, frame(da, side, FACTORS)[:, :a.rank],
                                   frame(db, side, FACTORS)[:, :b.rank], side, gen)
    if not rows:
        return pd.DataFrame()
    return _typed(pd.concat(rows, ignore_index=True), ("rank_1", "rank_2", "seed_1", "seed_2", "layer"))


def require_layers(layers: list[int] | None, have: list[int]) -> None:
    """Raise InputError naming the first of ``layers`` not in ``have``, and those there are."""
    missing = [x for x in layers or [] if x not in have]
    if missing:
        raise InputError(f"grid layer {missing[0]} is not in the sweep's analysed modules "
                         f"(layers: {_spans(have) or 'none'})")


def _grid_rows(kind, a, b, da: Decomp, ua, ub, side: str, gen) -> list[pd.DataFrame]:
    """The trained φ(i, j) grid of one module and side, and its random twin."""
    n, ia, jb = ua.shape[0], ua.shape[1], ub.shape[1]
    random = (random_orthonormal(n, ia, generator=gen), random_orthonormal(n, jb, generator=gen))
    ii, jj = np.meshgrid(np.arange(1, ia + 1), np.arange(1, jb + 1), indexing="ij")
    out = []
    for label, (x, y) in (("trained", (ua, ub)), ("random", random)):
        g = phi_grid(x, y, imax=ia, jmax=jb)
        out.append(pd.DataFrame({
            **_pair_ids(kind, a, b), "layer": da.layer, "module": da.module, "name": da.name,
            "side": side, "source": label, "basis": FACTORS if label == "trained" else "random",
            "i": ii.ravel(), "j": jj.ravel(), "phi": g.ravel()}))
    return out


def _spans(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0–2, 5, 7–8"."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}–{v}" if v != start else f"{v}")
            start = None
    return ", ".join(out)


def convergence(runs: list[RunDecomp]) -> pd.DataFrame:
    """How each LoRA update approaches the full one as r grows, per module.

    Columns: rel_dist = ‖ΔW_r − ΔW_full‖_F / ‖ΔW_full‖_F; phi_full_{left,right} = φ of the top-r
    directions of both; energy_share = share of ‖ΔW_full‖_F² inside ΔW_r's column space;
    phi_next_{left,right} = φ(ΔW_r, ΔW_r', r, r) with r' the next larger rank of the same seed.
    Every φ here is on ΔW's singular vectors (ordered by the update's own energy), also between
    two ranks, so that full and LoRA rows are measured alike.
    """
    full = {r.seed: r for r in runs if r.method == "full"}
    lora = sorted((r for r in runs if r.method == "lora"), key=lambda r: (_seed_key(r.seed), r.rank))
    nxt = {(a.run): b for a, b in zip(lora, lora[1:]) if a.seed == b.seed}
    rows, dense_full, last = [], {}, None   # module → (ΔW_full in float64, its norm) of f
    for r in lora:
        f = full.get(r.seed, next(iter(full.values()), None))
        if f is not last:   # runs come seed by seed: each full ΔW is made once
            dense_full, last = {}, f
        for name, d in r.modules.items():
            row = {"run": r.run, "method": "lora", "rank": r.rank, "seed": r.seed,
                   "layer": d.layer, "module": d.module, "name": name, "fro_norm": d.fro}
            df = f.modules.get(name) if f else None
            if df is not None:
                row.update(_against_full(d, df, r.rank, dense_full))
            n = nxt.get(r.run)
            if n is not None and name in n.modules:
                k = min(r.rank, d.S.numel())
                for side in SIDES:
                    row[f"phi_next_{side}"] = phi(frame(d, side)[:, :k],
                                                  frame(n.modules[name], side)[:, :k], k, k)
            rows.append(row)
    return _typed(pd.DataFrame(rows), ("rank", "seed", "layer"))


def _against_full(d: Decomp, df: Decomp, rank: int, cache: dict) -> dict:
    """rel_dist, phi_full_{side}, energy_share and full_fro_norm of one LoRA module."""
    if df.name not in cache:
        full_dense = df.dense()  # (d_out, d_in)
        cache[df.name] = (full_dense, torch.linalg.matrix_norm(full_dense))
    full_dense, full_norm = cache[df.name]
    row = {"rel_dist": float(torch.linalg.matrix_norm(d.dense() - full_dense) / full_norm)}
    k = min(rank, d.S.numel(), df.S.numel())
    for side in SIDES:
        row[f"phi_full_{side}"] = phi(frame(d, side)[:, :k], frame(df, side)[:, :k], k, k)
    row["energy_share"] = energy_in_subspace(d.U, df.U, df.S)
    row["full_fro_norm"] = df.fro
    return row


def relation_to_w(runs: list[RunDecomp], weights: dict[str, torch.Tensor], *,
                  svds: dict[str, tuple] | None = None) -> pd.DataFrame:
    """Hu et al. §7.3: ‖UᵀWV‖_F for ΔW's top-r, W's own and random directions, and amplification.

    LoRA runs use their own r; full runs every LoRA rank of the sweep (or 1, 4, 16, 64).
    ``svds``: W_0's SVDs from ``base_svds`` (computed here when not given).
    """
    svds = svds if svds is not None else base_svds(weights)
    ranks = sorted({r.rank for r in runs if r.method == "lora"}) or [1, 4, 16, 64]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for r in runs:
        for name, d in r.modules.items():
            if name not in weights:
                continue
            for k in ([r.rank] if r.method == "lora" else ranks):
                k = min(k, d.S.numel())
                p = projection_norms(weights[name], d.U[:, :k], d.Vh[:k], generator=gen,
                                     s_w=svds[name][1])
                rows.append({"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed,
                             "layer": d.layer, "module": d.module, "name": name, "r_dirs": k,
                             "delta_fro": d.fro, **p,
                             "amplification": amplification(d.fro, p["delta_dirs"])})
    return _typed(pd.DataFrame(rows), ("rank", "seed", "layer"))


def intruders(runs: list[RunDecomp], weights: dict[str, torch.Tensor], *, k: int = 10,
              eps_values: tuple[float, ...] = EPS, svds: dict[str, tuple] | None = None,
              dense: bool = False) -> pd.DataFrame:
    """Intruder-dimension counts (Shuttleworth et al. Def. 3.1) of W_0 + ΔW, per run and module.

    W_0's left singular vectors come from ``svds`` (``base_svds``, computed here when not
    given). W_0 + ΔW's top-k left singular vectors: for LoRA (d_out ≤ d_in) from W_0's SVD and
    ΔW's factorized one (``subspace.top_left_singular``: no SVD of W_0 + ΔW); else, or with
    ``dense``, a dense float32 SVD of W_0 + ΔW.
    """
    svds = svds if svds is not None else base_svds(weights)
    rows = []
    for r in runs:
        for name, d in r.modules.items():
            if name not in weights:
                continue
            kk = min(k, d.d_out, d.d_in)
            u0, s0, vh0 = svds[name]
            if d.delta.factored and d.d_out <= d.d_in and not dense:
                cos = top_left_singular(u0, s0, vh0, d.U * d.S, d.Vh.T, k=kk)[2]  # (d_out, kk)
                max_cos = cos.abs().max(dim=0).values.numpy()
            else:
                y = tall_svd(weights[name] + d.dense(), dtype=torch.float32)[0][:, :kk]
                max_cos = intruder_max_cos(y, u0)
            counts = counts_below(max_cos, eps_values)
            rows.extend({"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed,
                         "layer": d.layer, "module": d.module, "name": name, "k": kk,
                         "eps": e, "count": c} for e, c in counts.items())
    return _typed(pd.DataFrame(rows), ("rank", "seed", "layer"))


def run_metrics(runs: list[RunDecomp]) -> pd.DataFrame:
    """Each run's held-out metrics before and after training, from its manifest."""
    rows = []
    for r in runs:
        m = r.manifest
        rows.append({"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed,
                     **{f"before_{k}": v for k, v in m.get("eval_before", {}).items()},
                     **{f"after_{k}": v for k, v in m.get("eval_after", {}).items()},
                     "trainable_params": m.get("trainable_params"), "steps": m.get("steps"),
                     "wall_time_s": m.get("wall_time_s")})
    df = _typed(pd.DataFrame(rows), ("rank", "seed"))
    return df.sort_values(["method", "rank", "seed"], na_position="first", ignore_index=True)


def _typed(df: pd.DataFrame, cols) -> pd.DataFrame:
    for c in cols:
        if c in df:
            df[c] = df[c].astype("Int64")
    return df


def compare_frames(path: str | Path, *, grid_layers: list[int] | None = None,
                   n_draws: int = 100, progress: bool = False) -> dict[str, pd.DataFrame]:
    """Every analysis of a sweep but the truncation test, as {table name: DataFrame}.

    Each update is decomposed once (``decompose_sweep``: factorized SVDs for LoRA, one dense SVD
    per full-run module, svdvals for the full runs' other modules), and W_0 once per module
    (``base_svds``); every table reuses those.
    """
    if grid_layers:     # refused before any SVD, from the names of one LoRA run's modules
        lora = [s for s in from_runs(path) if s.method == "lora"]
        if lora:
            require_layers(grid_layers, sorted({d.layer for d in lora[0] if d.layer is not None}))
    runs = decompose_sweep(path, keep=None, spectra=True, progress=progress)
    weights = base_weights(runs)
    svds = base_svds(weights)
    spectra, modules = spectra_tables(runs)
    return {"metrics": run_metrics(runs), "modules": modules, "spectra": spectra,
            "subspace": subspace_similarity(runs, n_draws=n_draws),
            "subspace_grid": subspace_grids(runs, layers=grid_layers),
            "convergence": convergence(runs),
            "relation": relation_to_w(runs, weights, svds=svds),
            "intruders": intruders(runs, weights, svds=svds)}


def compare(path: str | Path, out: str | Path, *, grid_layers: list[int] | None = None,
            n_draws: int = 100, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every analysis of a sweep into ``out``: the tables of ``compare_frames`` (with the
    spectra of every module, ``modules.csv`` and ``spectra.csv``) and the verdict.

    Returns:
        {table name: DataFrame}.
    """
    from rankscope.store.results import prepare_out, save_tables, write_verdict

    out = prepare_out(out)
    frames = compare_frames(path, grid_layers=grid_layers, n_draws=n_draws, progress=progress)
    save_tables(out, frames, inputs={"runs": str(path)})
    write_verdict(out)
    return frames
