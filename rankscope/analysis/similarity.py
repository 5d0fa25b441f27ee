"""How updates' singular subspaces relate to each other: φ between LoRA ranks, seeds and full
fine-tuning (Hu et al. 2021 eq. 4, Figs. 3–4) on the column space (B), the row space (A) and
the row space training learned (A − A₀), with its random-subspace null and how far A moved
from its initialisation; and how each LoRA update approaches the full one as r grows.

Each table function takes the decomposed runs (``decompose.decompose_sweep``) and returns one
tidy DataFrame. Definitions: docs/science.md.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from rankscope.analysis.tables import ID_INTS, nullable_ints
from rankscope.errors import InputError
from rankscope.linalg.subspace import (energy_in_subspace, phi, phi_grid, phi_null_grid_quantiles,
                                       phi_null_mean, phi_null_quantiles, random_orthonormal,
                                       relative_fro_distance)

SIDES = {"right": "Vh", "left": "U"}   # right: row space (of A); left: column space (of B)
# The bases φ is measured in (the ``basis`` column): ΔW's singular vectors, or Hu et al.'s
# factors: B's left singular vectors (column space), A's right ones (row space), and the right
# singular vectors of A − A₀ (the row space training learned, when the run saved A₀).
DELTA, COLS, ROWS, MOVED = "ΔW", "B", "A", "A−A₀"
_FACTOR_KEY = {("left", COLS): "left", ("right", ROWS): "right", ("right", MOVED): "right_moved"}
PAIR_INTS = ("rank_1", "rank_2", "seed_1", "seed_2", "layer")


def frame(d, side: str, basis: str = DELTA) -> torch.Tensor | None:
    """Orthonormal columns of one side of an update, most important first.

    basis "ΔW": ΔW's singular vectors, U or Vhᵀ (any update). "B" (left) and "A" (right): B's
    left or A's right singular vectors (Hu et al. eq. 4; LoRA only): same spans, other order.
    "A−A₀" (right): the right singular vectors of A − A₀; None when the run did not save A₀
    or A did not move.
    """
    if basis == DELTA:
        return d.U if side == "left" else d.Vh.T
    return d.factor_frames.get(_FACTOR_KEY[(side, basis)])


def pair_bases(kind: str) -> list[tuple[str, str]]:
    """(side, basis) of each φ measured for a pair. LoRA-vs-LoRA pairs (ranks, seeds): B's
    column space, A's row space and A − A₀'s; pairs with full: ΔW's on both sides, and the LoRA
    run's A − A₀ against the full update's row space (the full side always in ΔW's basis)."""
    if kind == "full":
        return [("left", DELTA), ("right", DELTA), ("right", MOVED)]
    return [("left", COLS), ("right", ROWS), ("right", MOVED)]


def _frames(kind: str, da, db, side: str, basis: str):
    """The two frames of one (side, basis) of a pair; (None, None) when one is missing."""
    fa = frame(da, side, basis)
    fb = frame(db, side, DELTA if kind == "full" else basis)
    return (fa, fb) if fa is not None and fb is not None else (None, None)


def _null(n: int, i: int, j: int, cache: dict, n_draws: int) -> tuple[float, float]:
    """φ's 95% and 99% null quantiles for these sizes, once per (n, i, j), seeded by the sizes."""
    key = (n, i, j)
    if key not in cache:
        gen = torch.Generator().manual_seed(hash(key) % 2**31)   # ints hash alike every run
        q95, q99 = phi_null_quantiles(n, i, j, (0.95, 0.99), n_draws=n_draws, generator=gen)
        cache[key] = (float(q95), float(q99))
    return cache[key]


def run_a_moved(run, name: str) -> float:
    """‖A − A₀‖_F/‖A₀‖_F of one LoRA run's module: from its A₀ when saved, else the manifest's
    ``a_moved`` of the module, else the median of the manifest's over modules, else NaN."""
    d = run.modules.get(name)
    if d is not None and d.a_moved is not None:
        return d.a_moved
    moved = run.manifest.get("a_moved") or {}
    if moved.get(name) is not None:
        return float(moved[name])
    vals = [float(v) for v in moved.values() if v is not None]
    return float(np.median(vals)) if vals else float("nan")


def pair_a_moved(a, b, name: str) -> float:
    """The smaller of the pair's LoRA runs' ``run_a_moved`` (a full run has no A): φ on A's row
    space says little when either A has barely left its initialisation."""
    vals = [run_a_moved(r, name) for r in (a, b) if r.method == "lora"]
    vals = [v for v in vals if not np.isnan(v)]
    return min(vals) if vals else float("nan")


def lora_pairs(runs: list) -> list[tuple]:
    """Pairs of LoRA runs: every two ranks with one seed, and every two seeds with one rank."""
    lora = [r for r in runs if r.method == "lora"]
    pairs = []
    for a, b in itertools.combinations(lora, 2):
        if a.seed == b.seed and a.rank != b.rank:
            pairs.append(("ranks", *sorted((a, b), key=lambda r: r.rank)))
        elif a.rank == b.rank and a.seed != b.seed:
            pairs.append(("seeds", a, b))
    return pairs


def _pair_ids(kind: str, a, b) -> dict:
    return {"pair": kind, "run_1": a.run, "run_2": b.run, "rank_1": a.rank, "rank_2": b.rank,
            "seed_1": a.seed, "seed_2": b.seed}


def subspace_similarity(runs: list, *, n_draws: int = 200) -> pd.DataFrame:
    """φ of the top direction and of the top-m directions, m = min(r1, r2), for every pair.

    Pairs: LoRA ranks (same seed) and LoRA seeds (same rank), in the bases of ``pair_bases``
    (B's column space, A's row space and A − A₀'s), and each LoRA run against the full update
    of its seed (or the first full run), in ΔW's singular vectors (and A − A₀ against the full
    row space). n = d_in for the right (row) space and d_out for the left. The null: its mean
    max(i, j)/n (``null_mean``) and its 95% and 99% quantiles (``null_q95``, ``null_q99``; exact
    for i = 1, else from ``n_draws`` seeded Haar draws), since φ's null is heavy-tailed.
    ``a_moved`` is ``pair_a_moved``: below ~0.5, φ on A's row space measures its initialisation.

    Returns:
        One row per pair, module, side, basis and i: ``pair, run_1, run_2, rank_1, rank_2,
        seed_1, seed_2, layer, module, name, side, basis, i, j, phi, null_mean, null_q95,
        null_q99, a_moved``.
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
            moved = pair_a_moved(a, b, name)
            for side, basis in pair_bases(kind):
                ua, ub = _frames(kind, da, db, side, basis)
                if ua is None:
                    continue
                m = min(x for x in (a.rank, b.rank, ua.shape[1], ub.shape[1]) if x)
                n = ua.shape[0]
                grid = phi_grid(ua, ub, imax=m, jmax=m)  # (m, m): φ(i, i) on its diagonal
                for i in sorted({1, m}):
                    q95, q99 = _null(n, i, i, cache, n_draws)
                    rows.append({**_pair_ids(kind, a, b), "layer": da.layer, "module": da.module,
                                 "name": name, "side": side, "basis": basis, "i": i, "j": i,
                                 "phi": float(grid[i - 1, i - 1]),
                                 "null_mean": phi_null_mean(n, i, i),
                                 "null_q95": q95, "null_q99": q99, "a_moved": moved})
    return nullable_ints(pd.DataFrame(rows), PAIR_INTS)


def grid_pairs(runs: list, *, ranks: tuple[int, int] = (8, 64)):
    """The pairs Hu et al. draw: r = 8 vs 64 (Fig. 3) and two seeds at r = 64 (Fig. 4).

    Falls back to the closest ranks the sweep has: the largest rank and the one nearest
    ``ranks[0]``. The rank pair is drawn for every seed that has both ranks (a statistic of
    one pair of runs moves as a change of seed does), the seed pair from the first two seeds
    that have the top rank; a pair no seed completes (an unfinished run) is left out.
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
    if lo is not None:
        out += [("ranks", by[(lo, s)], by[(hi, s)]) for s in seeds_at[hi] if s in seeds_at[lo]]
    if len(seeds_at[hi]) >= 2:
        s1, s2 = seeds_at[hi][:2]
        out.append(("seeds", by[(hi, s1)], by[(hi, s2)]))
    return out


def _seed_key(seed):
    return (seed is None, seed if seed is not None else 0)


def subspace_grids(runs: list, *, layers: list[int] | None = None, seed: int = 0,
                   n_draws: int = 200) -> pd.DataFrame:
    """φ(i, j) grids for the figure pairs, at the chosen layers (default: the middle one).

    The trained grids (``source`` "trained") are in the bases of ``pair_bases``: B's column
    space (side "left", ``basis`` "B"), A's row space ("right", "A") and A − A₀'s ("right",
    "A−A₀", when both runs saved A₀); each side comes with a 'random' twin (``basis``
    "random"): two independent random subspaces of the same sizes. Every row carries the null's
    95% and 99% quantiles of its (i, j) (``phi_null_grid_quantiles``: exact where min(i, j) = 1,
    else ``n_draws`` seeded Haar draws) and the pair's ``a_moved``.

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
    rows, nulls = [], {}
    for kind, a, b in pairs:
        for name, da in a.modules.items():
            db = b.modules.get(name)
            if db is None or da.layer not in layers:
                continue
            ids = {**_pair_ids(kind, a, b), "layer": da.layer, "module": da.module, "name": name}
            moved = pair_a_moved(a, b, name)
            for side, basis in pair_bases(kind):
                ua, ub = _frames(kind, da, db, side, basis)
                if ua is not None:
                    rows.append(_grid(ids, side, "trained", basis, ua[:, :a.rank], ub[:, :b.rank],
                                      nulls, n_draws).assign(a_moved=moved))
            for side in SIDES:   # the random twin, once per side, of the sizes of B's or A's frames
                ua, ub = (frame(d, side, COLS if side == "left" else ROWS) for d in (da, db))
                n, ia, jb = ua.shape[0], min(ua.shape[1], a.rank), min(ub.shape[1], b.rank)
                x = random_orthonormal(n, ia, generator=gen)
                y = random_orthonormal(n, jb, generator=gen)
                rows.append(_grid(ids, side, "random", "random", x, y, nulls, n_draws)
                            .assign(a_moved=moved))
    if not rows:
        return pd.DataFrame()
    return nullable_ints(pd.concat(rows, ignore_index=True), PAIR_INTS)


def _grid(ids: dict, side: str, source: str, basis: str, ua, ub, nulls: dict,
          n_draws: int) -> pd.DataFrame:
    """One φ(i, j) grid as tidy rows, with its null quantiles (once per (n, i_max, j_max))."""
    n, ia, jb = ua.shape[0], ua.shape[1], ub.shape[1]
    key = (n, ia, jb)
    if key not in nulls:
        gen = torch.Generator().manual_seed(hash(key) % 2**31)
        nulls[key] = phi_null_grid_quantiles(n, ia, jb, (0.95, 0.99), n_draws=n_draws,
                                             generator=gen)  # (2, ia, jb)
    ii, jj = np.meshgrid(np.arange(1, ia + 1), np.arange(1, jb + 1), indexing="ij")
    return pd.DataFrame({**ids, "side": side, "source": source, "basis": basis,
                         "i": ii.ravel(), "j": jj.ravel(),
                         "phi": phi_grid(ua, ub, imax=ia, jmax=jb).ravel(),
                         "null_q95": nulls[key][0].ravel(), "null_q99": nulls[key][1].ravel()})


def require_layers(layers: list[int] | None, have: list[int]) -> None:
    """Raise InputError naming the first of ``layers`` not in ``have``, and those there are."""
    missing = [x for x in layers or [] if x not in have]
    if missing:
        raise InputError(f"grid layer {missing[0]} is not in the sweep's analysed modules "
                         f"(layers: {_spans(have) or 'none'})")


def _spans(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0–2, 5, 7–8"."""
    out, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(f"{start}–{v}" if v != start else f"{v}")
            start = None
    return ", ".join(out)


def convergence_table(runs: list, *, n_draws: int = 200) -> pd.DataFrame:
    """How each LoRA update approaches the full one as r grows, per module: scale-free numbers,
    each beside its null (a uniformly random counterpart of the same sizes).

    Against the full update (``_against_full``): fro_cos = ⟨ΔW_r, ΔW_full⟩_F / (‖ΔW_r‖_F
    ‖ΔW_full‖_F); phi_full_{left,right} = φ(ΔW_r, ΔW_full, k, k), k = min(r, both ranks);
    energy_share = share of ‖ΔW_full‖_F² inside ΔW_r's column space; rel_dist = ‖ΔW_r −
    ΔW_full‖_F / ‖ΔW_full‖_F, not scale-free (≥ 1 whenever ‖ΔW_r‖ ≥ 2‖ΔW_full‖: it reads the
    rates); full_fro_norm. Between ranks: phi_next_{left,right} = φ(ΔW_r, ΔW_r', k, k), r' the
    next larger rank of the same seed. Every φ is on ΔW's singular vectors, so that full and
    LoRA rows are measured alike. The full run is the LoRA run's seed's, else the first one;
    it should adapt the same modules (``full_scope: targets``).

    Nulls: fro_cos_null_q99 = 99% quantile of |cos| against a random direction of R^n,
    n = d_out·d_in (cos² ~ Beta(1/2, (n − 1)/2), exact); {phi_full,phi_next}_{side}_null_q95
    and _q99 = φ(k, k)'s quantiles for n = d_out (left) or d_in (right) (``_null``: exact for
    k = 1, else ``n_draws`` seeded Haar draws); energy_share_null = p/d_out, the expected share
    in a random p-dim column subspace (p = ΔW_r's singular vectors), exact for any ΔW_full;
    energy_share_null_q99 = its 99% quantile for this ΔW_full's spectrum (``_energy_null_q99``).

    Returns:
        One row per LoRA run and module: ``run, method, rank, seed, layer, module, name,
        fro_norm`` and the columns above (NaN without a full or next-rank twin; fro_cos NaN
        when ΔW_r = 0).
    """
    full = {r.seed: r for r in runs if r.method == "full"}
    lora = sorted((r for r in runs if r.method == "lora"), key=lambda r: (_seed_key(r.seed), r.rank))
    nxt = {(a.run): b for a, b in zip(lora, lora[1:]) if a.seed == b.seed}
    rows, dense_full, last = [], {}, None   # module → ΔW_full in float64, of the full run f
    nulls = {"phi": {}, "energy": {}, "n_draws": n_draws}   # caches of the null draws, by size
    for r in lora:
        f = full.get(r.seed, next(iter(full.values()), None))
        if f is not last:   # runs come seed by seed: each full ΔW is made once
            dense_full, last = {}, f
        for name, d in r.modules.items():
            row = {"run": r.run, "method": "lora", "rank": r.rank, "seed": r.seed,
                   "layer": d.layer, "module": d.module, "name": name, "fro_norm": d.fro}
            df = f.modules.get(name) if f else None
            if df is not None:
                row.update(_against_full(d, df, r.rank, dense_full, nulls))
            n = nxt.get(r.run)
            if n is not None and name in n.modules:
                k = min(r.rank, d.S.numel())
                for side in SIDES:
                    row[f"phi_next_{side}"] = phi(frame(d, side)[:, :k],
                                                  frame(n.modules[name], side)[:, :k], k, k)
                    row.update(_phi_nulls(f"phi_next_{side}", frame(d, side).shape[0], k, nulls))
            rows.append(row)
    return nullable_ints(pd.DataFrame(rows), ID_INTS)


def _phi_nulls(col: str, n: int, k: int, nulls: dict) -> dict:
    """``col``_null_q95 and _null_q99: φ(k, k)'s null quantiles in R^n (``_null``)."""
    q95, q99 = _null(n, k, k, nulls["phi"], nulls["n_draws"])
    return {f"{col}_null_q95": q95, f"{col}_null_q99": q99}


def _against_full(d, df, rank: int, cache: dict, nulls: dict) -> dict:
    """fro_cos, phi_full_{side}, energy_share, rel_dist and full_fro_norm of one LoRA module
    ``d`` against the full run's ``df`` (both ``decompose.Decomp``), each with its null
    (``convergence_table``)."""
    if df.name not in cache:
        cache[df.name] = df.dense()  # (d_out, d_in) ΔW_full in float64
    x, y = d.dense(), cache[df.name]  # (d_out, d_in) each
    norms = float(torch.linalg.vector_norm(x)) * float(torch.linalg.vector_norm(y))
    row = {"fro_cos": float((x * y).sum()) / norms if norms else float("nan"),  # ΔW_r = 0: none
           "fro_cos_null_q99": _fro_cos_q99(x.numel())}
    k = min(rank, d.S.numel(), df.S.numel())
    for side in SIDES:
        fa, fb = frame(d, side), frame(df, side)
        row[f"phi_full_{side}"] = phi(fa[:, :k], fb[:, :k], k, k)
        row.update(_phi_nulls(f"phi_full_{side}", fa.shape[0], k, nulls))
    p = d.U.shape[1]
    row["energy_share"] = energy_in_subspace(d.U, df.U, df.S)
    row["energy_share_null"] = p / d.U.shape[0]
    row["energy_share_null_q99"] = _energy_null_q99(df.S, d.U.shape[0], p, nulls)
    row["rel_dist"] = relative_fro_distance(x, y)
    row["full_fro_norm"] = df.fro
    return row


def _fro_cos_q99(n: int) -> float:
    """99% quantile of |cos| between a fixed vector and a uniformly random one in R^n:
    cos² ~ Beta(1/2, (n − 1)/2), so it is the root of that Beta's 99% quantile (1 when n = 1)."""
    from scipy.stats import beta

    return 1.0 if n == 1 else float(np.sqrt(beta.ppf(0.99, 0.5, (n - 1) / 2)))


def _energy_null_q99(S: torch.Tensor, n: int, p: int, nulls: dict) -> float:
    """99% quantile of the share of an update's energy (singular values S) inside a uniformly
    random p-dim subspace of R^n.

    For a Haar frame Q (n, p), the share ‖QᵀU diag(S)‖_F² / Σ S² has the law of Σ_i w_i ‖Qᵀe_i‖²,
    w_i = σ_i²/Σ S² (rotate U onto the first axes): so one set of ``n_draws`` seeded draws of
    the projector's diagonal per (n, p) serves every update of that size. Its mean is p/n.
    """
    key = (n, p)
    draws = nulls["energy"]
    if key not in draws:
        gen = torch.Generator().manual_seed(hash(key) % 2**31)   # ints hash alike every run
        draws[key] = torch.stack([random_orthonormal(n, p, generator=gen).square().sum(1)
                                  for _ in range(nulls["n_draws"])]).numpy()  # (n_draws, n)
    s2 = S.detach().double().square().numpy()  # (m,), m ≤ n; not all 0 (energy_share checked)
    return float(np.quantile(draws[key][:, :s2.size] @ (s2 / s2.sum()), 0.99))
