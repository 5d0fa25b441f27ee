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

from .decompose import Decomp, RunDecomp, decompose_sweep
from .models import find_linear_modules, linear_weight, load_backbone, match_name
from .spectra import dense_svd
from .subspace import (amplification, energy_in_subspace, intruder_counts, phi, phi_grid,
                       phi_null_draws, phi_null_mean, projection_norms, random_orthonormal)

SIDES = {"right": "Vh", "left": "U"}   # right: row space (of A); left: column space (of B)
EPS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def frame(d: Decomp, side: str) -> torch.Tensor:
    """Orthonormal columns of one side of ΔW's singular vectors: U, or Vhᵀ for the right side."""
    return d.U if side == "left" else d.Vh.T


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

    Pairs: LoRA ranks (same seed), LoRA seeds (same rank) and each LoRA run against the full
    update of its seed (its top-r directions). Both sides; with the analytic null max(i, j)/n
    and an empirical draw of random subspaces (mean and standard deviation).
    """
    full = {r.seed: r for r in runs if r.method == "full"}
    pairs = lora_pairs(runs)
    pairs += [("full", r, full.get(r.seed, next(iter(full.values()))))
              for r in runs if r.method == "lora" and full]
    rows, cache = [], {}
    for kind, a, b in pairs:
        for name, da in a.modules.items():
            db = b.modules.get(name)
            if db is None:
                continue
            m = min(x for x in (a.rank, b.rank, da.S.numel(), db.S.numel()) if x)
            for side in SIDES:
                ua, ub = frame(da, side), frame(db, side)
                n = ua.shape[0]
                for i in sorted({1, m}):
                    mean, std = _null(n, i, i, cache, n_draws)
                    rows.append({**_pair_ids(kind, a, b), "layer": da.layer, "module": da.module,
                                 "name": name, "side": side, "i": i, "j": i,
                                 "phi": phi(ua, ub, i, i), "null_mean": phi_null_mean(n, i, i),
                                 "null_draw_mean": mean, "null_draw_std": std})
    return _typed(pd.DataFrame(rows), ("rank_1", "rank_2", "seed_1", "seed_2", "layer"))


def grid_pairs(runs: list[RunDecomp], *, ranks: tuple[int, int] = (8, 64)):
    """The pairs Hu et al. draw: r = 8 vs 64 of one seed (Fig. 3), two seeds at r = 64 (Fig. 4).

    Falls back to the closest ranks the sweep has: the largest rank and the one nearest ``ranks[0]``.
    """
    lora = sorted((r for r in runs if r.method == "lora"), key=lambda r: (r.seed, r.rank))
    if not lora:
        return []
    have = sorted({r.rank for r in lora})
    hi = ranks[1] if ranks[1] in have else have[-1]
    lo = min((r for r in have if r < hi), key=lambda r: abs(r - ranks[0]), default=None)
    seed0 = lora[0].seed
    by = {(r.rank, r.seed): r for r in lora}
    out = []
    if lo is not None:
        out.append(("ranks", by[(lo, seed0)], by[(hi, seed0)]))
    seeds = sorted({r.seed for r in lora if r.rank == hi})
    if len(seeds) >= 2:
        out.append(("seeds", by[(hi, seeds[0])], by[(hi, seeds[1])]))
    return out


def subspace_grids(runs: list[RunDecomp], *, layers: list[int] | None = None,
                   seed: int = 0) -> pd.DataFrame:
    """φ(i, j) grids for the figure pairs, at the chosen layers (default: the middle one).

    Each grid comes with a 'random' twin: two independent random subspaces of the same sizes.
    """
    pairs = grid_pairs(runs)
    if not pairs:
        return pd.DataFrame()
    all_layers = sorted({d.layer for d in pairs[0][1].modules.values() if d.layer is not None})
    layers = layers or ([all_layers[len(all_layers) // 2]] if all_layers else [])
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for kind, a, b in pairs:
        for name, da in a.modules.items():
            db = b.modules.get(name)
            if db is None or da.layer not in layers:
                continue
            for side in SIDES:
                ua, ub = frame(da, side)[:, :a.rank], frame(db, side)[:, :b.rank]
                n, ia, jb = ua.shape[0], ua.shape[1], ub.shape[1]
                random = (random_orthonormal(n, ia, generator=gen), random_orthonormal(n, jb, generator=gen))
                for label, (x, y) in (("trained", (ua, ub)), ("random", random)):
                    g = phi_grid(x, y, imax=ia, jmax=jb)
                    ii, jj = np.meshgrid(np.arange(1, ia + 1), np.arange(1, jb + 1), indexing="ij")
                    rows.append(pd.DataFrame({
                        **_pair_ids(kind, a, b), "layer": da.layer, "module": da.module,
                        "name": name, "side": side, "source": label, "i": ii.ravel(),
                        "j": jj.ravel(), "phi": g.ravel()}))
    return _typed(pd.concat(rows, ignore_index=True), ("rank_1", "rank_2", "seed_1", "seed_2", "layer"))


def convergence(runs: list[RunDecomp]) -> pd.DataFrame:
    """How each LoRA update approaches the full one as r grows, per module.

    Columns: rel_dist = ‖ΔW_r − ΔW_full‖_F / ‖ΔW_full‖_F; phi_full_{left,right} = φ of the top-r
    directions of both; energy_share = share of ‖ΔW_full‖_F² inside ΔW_r's column space;
    phi_next_{left,right} = φ(ΔW_r, ΔW_r', r, r) with r' the next larger rank of the same seed.
    """
    full = {r.seed: r for r in runs if r.method == "full"}
    lora = sorted((r for r in runs if r.method == "lora"), key=lambda r: (r.seed, r.rank))
    nxt = {(a.run): b for a, b in zip(lora, lora[1:]) if a.seed == b.seed}
    rows = []
    for r in lora:
        f = full.get(r.seed, next(iter(full.values()), None))
        for name, d in r.modules.items():
            row = {"run": r.run, "method": "lora", "rank": r.rank, "seed": r.seed,
                   "layer": d.layer, "module": d.module, "name": name, "fro_norm": d.fro}
            df = f.modules.get(name) if f else None
            if df is not None:
                full_dense = df.dense()
                row["rel_dist"] = float(torch.linalg.matrix_norm(d.dense() - full_dense) /
                                        torch.linalg.matrix_norm(full_dense))
                k = min(r.rank, d.S.numel(), df.S.numel())
                for side in SIDES:
                    row[f"phi_full_{side}"] = phi(frame(d, side), frame(df, side), k, k)
                row["energy_share"] = energy_in_subspace(d.U, df.U, df.S)
                row["full_fro_norm"] = df.fro
            n = nxt.get(r.run)
            if n is not None and name in n.modules:
                k = min(r.rank, d.S.numel())
                for side in SIDES:
                    row[f"phi_next_{side}"] = phi(frame(d, side), frame(n.modules[name], side), k, k)
            rows.append(row)
    return _typed(pd.DataFrame(rows), ("rank", "seed", "layer"))


def base_weights(runs: list[RunDecomp]) -> dict[str, torch.Tensor]:
    """W_0 of every analysed module, from the runs' base model, keyed by the runs' names."""
    model_path = runs[0].manifest.get("model_path") or runs[0].manifest.get("model")
    base = load_backbone(model_path)
    infos = {i.name for i in find_linear_modules(base)}
    names = {n for r in runs for n in r.modules}
    out = {}
    for n in names:
        hit = match_name(n, infos)
        if hit is not None:
            out[n] = linear_weight(base.get_submodule(hit)).detach().double()
    return out


def relation_to_w(runs: list[RunDecomp], weights: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Hu et al. §7.3: ‖UᵀWV‖_F for ΔW's top-r, W's own and random directions, and amplification.

    LoRA runs use their own r; full runs every LoRA rank of the sweep (or 1, 4, 16, 64).
    """
    ranks = sorted({r.rank for r in runs if r.method == "lora"}) or [1, 4, 16, 64]
    s_w = {n: dense_svd(w, dtype=torch.float64, compute_uv=False) for n, w in weights.items()}
    gen = torch.Generator().manual_seed(0)
    rows = []
    for r in runs:
        for name, d in r.modules.items():
            if name not in weights:
                continue
            for k in ([r.rank] if r.method == "lora" else ranks):
                k = min(k, d.S.numel())
                p = projection_norms(weights[name], d.U[:, :k], d.Vh[:k], generator=gen, s_w=s_w[name])
                rows.append({"run": r.run, "method": r.method, "rank": r.rank, "seed": r.seed,
                             "layer": d.layer, "module": d.module, "name": name, "r_dirs": k,
                             "delta_fro": d.fro, **p,
                             "amplification": amplification(d.fro, p["delta_dirs"])})
    return _typed(pd.DataFrame(rows), ("rank", "seed", "layer"))


def intruders(runs: list[RunDecomp], weights: dict[str, torch.Tensor], *, k: int = 10,
              eps_values: tuple[float, ...] = EPS) -> pd.DataFrame:
    """Intruder-dimension counts (Shuttleworth et al. Def. 3.1) of W_0 + ΔW, per run and module."""
    u0 = {n: dense_svd(w, dtype=torch.float32)[0] for n, w in weights.items()}
    rows = []
    for r in runs:
        for name, d in r.modules.items():
            if name not in weights:
                continue
            w_ft = weights[name] + d.dense()
            kk = min(k, min(w_ft.shape))
            counts = intruder_counts(weights[name], w_ft, k=kk, eps_values=eps_values,
                                     dtype=torch.float32, U0=u0[name])
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


def compare_frames(path: str | Path, *, keep: int = 64, grid_layers: list[int] | None = None,
                   n_draws: int = 100) -> dict[str, pd.DataFrame]:
    """Every analysis of a sweep, as {table name: DataFrame}; each SVD computed once."""
    runs = decompose_sweep(path, keep=None)
    weights = base_weights(runs)
    return {"metrics": run_metrics(runs),
            "subspace": subspace_similarity(runs, n_draws=n_draws),
            "subspace_grid": subspace_grids(runs, layers=grid_layers),
            "convergence": convergence(runs),
            "relation": relation_to_w(runs, weights),
            "intruders": intruders(runs, weights)}


def compare(path: str | Path, out: str | Path, *, grid_layers: list[int] | None = None,
            n_draws: int = 100, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Every analysis of a sweep into ``out``: the tables of ``compare_frames``, the spectra
    of every module (``modules.csv``, ``spectra.csv``) and the verdict.

    Returns:
        {table name: DataFrame}.
    """
    from .analysis import analyze_deltas
    from .deltas import from_runs
    from .results import prepare_out, save_tables, write_verdict

    out = prepare_out(out)
    frames = compare_frames(path, grid_layers=grid_layers, n_draws=n_draws)
    frames["spectra"], frames["modules"] = analyze_deltas(from_runs(path), progress=progress)
    save_tables(out, frames, inputs={"runs": str(path)})
    write_verdict(out)
    return frames
