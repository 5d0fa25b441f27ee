"""A LoRA rank per module from a sweep's measurements, with its evidence and a confidence.

Pure functions of the results tables (``store.results.load_tables``); no model, file or print
here (``recommend.stage`` writes the files). Four pieces of evidence, each a rank:

* **energy** (per module): k_τ of the full update (τ = 90%), rounded up to a power of two;
  with no full run, that of the largest LoRA run (a lower bound when it fills its rank).
* **φ** (per module): the number of directions two neighbouring LoRA ranks r < r′ share
  beyond chance, d_φ = r·(φ − r/n)/(1 − r/n) with φ = φ(ΔW_r, ΔW_r′, r, r) on the column
  space (n = d_out; chance gives 0, identical top-r spaces give r), maximised over r and
  rounded up to a power of two. Hu et al. §7.2 read their Figure 3 this way: directions that
  both ranks learn are the update; the rest changes with r and is noise.
* **knee** (global): the smallest LoRA rank within max(5% of the best gain, the seeds'
  spread) of the best rank's gain over the base model. A sweep trains one set of targets, so
  the knee is the rank the most demanding module needs.
* **truncation** (global): the smallest k at which W_0 + trunc_k(ΔW_full) keeps 90% of full
  fine-tuning's gain, all modules truncated at once.

The global (functional) ranks are uniform ranks that suffice for the metric; the per-module
(structural) rank says how much of that a module needs: the φ rank where two neighbouring LoRA
ranks were trained, else the energy rank. The recommendation is
r = min(structural, max(knee, truncation)) per module: no more rank than the metric needs, and
no more than the module's update holds. φ comes first because the known-answer control says so
(tests/pipeline/test_planted_controls.py): on a planted rank of 4, full fine-tuning's k₉₀ is
43 (query) and 14.5 (value), as the optimiser spreads energy over directions the text barely
excites, while the directions shared by neighbouring LoRA ranks number 4.5 and 4.9. Each piece agrees when within a factor 2 of r (a
global rank also agrees when above r: another module may need it). Confidence: high when
≥ 3 pieces all agree (and the metric had stopped improving), medium when all but one agree
(≥ 2), low otherwise.

Under a parameter budget (a rank-r adapter on a (d_out, d_in) module costs r·(d_out + d_in)),
ranks are allocated greedily, one direction at a time, to the module whose next singular
value adds the largest share of that module's energy σ_{k+1}²/Σσ² per parameter (scale-free
per module, as EVA's explained-variance ratios). Ranks are any integer: the shares fall with
k, so greedy is optimal up to the last direction, where powers of two could waste up to half
of the budget.
"""
from __future__ import annotations

import heapq
import math

import numpy as np
import pandas as pd

from rankscope.errors import InputError
from rankscope.analysis.verdict import metric_by_rank, metric_name

TAU = 90                 # energy share (%) of the energy rank: Biderman et al.'s k_90
KNEE_SHARE = 0.95        # share of the best LoRA gain that counts as the plateau
TRUNC_SHARE = 0.9        # share of the full gain that defines the functional rank
PHI_SIDE = "left"        # column space: LoRA's B learns it from zero; A stays near its random init
EVIDENCE = ("energy", "phi", "knee", "truncation")


def pow2_ceil(x: float) -> int:
    """The smallest power of two ≥ x (1 for x ≤ 1)."""
    return 1 if x <= 1 else 2 ** math.ceil(math.log2(x) - 1e-9)


def parse_budget(text) -> int:
    """A parameter count from ``1.5M``, ``200k``, ``1500000``, ``2e6`` or a number.

    Raises:
        InputError: text that is not a positive count.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        mult = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(s[-1:].lower(), 1.0)
        try:
            value = float(s[:-1] if mult != 1.0 else s) * mult
        except ValueError:
            raise InputError(f"budget: cannot read {text!r} as a parameter count "
                             "(use e.g. 1.5M, 200k or 1500000)") from None
    if not math.isfinite(value) or value < 1:
        raise InputError(f"budget: must be a positive parameter count, got {text!r}")
    return int(round(value))


# ------------------------------------------------------------------- the candidate modules

def candidates(modules: pd.DataFrame, *, targets: tuple[str, ...] | None = None) -> pd.DataFrame:
    """The modules to recommend a rank for: ``name, layer, module, d_out, d_in``.

    Default: the modules the sweep's LoRA runs adapted (every updated module without LoRA
    runs). ``targets`` picks module kinds or names among every updated module, or
    ``all-linear`` all of them.

    Raises:
        InputError: no module matches ``targets``.
    """
    cols = ["name", "layer", "module", "d_out", "d_in"]
    lora = modules[modules["method"] == "lora"]
    if targets is None:
        pool = lora if len(lora) else modules
    elif tuple(targets) == ("all-linear",):
        pool = modules
    else:
        hit = modules["name"].map(lambda n: any(n == t or n.endswith("." + t) for t in targets))
        pool = modules[hit | modules["module"].isin(targets)]
    out = pool[cols].drop_duplicates("name")
    if out.empty:
        have = ", ".join(sorted(modules["module"].astype(str).unique()))
        raise InputError(f"targets {list(targets or [])} match no updated module (modules: {have})")
    return out.sort_values(["layer", "name"], na_position="last").reset_index(drop=True)


# ---------------------------------------------------------------------------- evidence

def energy_evidence(modules: pd.DataFrame, *, tau: int = TAU) -> pd.DataFrame:
    """Per module: k_τ of the full update (median over seeds), else of the largest LoRA run.

    Returns:
        ``name, energy_rank, energy_source, energy_bound`` (bound: the LoRA run's rank caps
        k_τ, so the value is a lower bound).
    """
    col = f"energy_rank_{tau}"
    full = modules[modules["method"] == "full"]
    if len(full):
        e = full.groupby("name")[col].median().reset_index(name="energy_rank")
        return e.assign(energy_source="full", energy_bound=False)
    lora = modules[modules["method"] == "lora"]
    top = lora[lora["rank"] == lora.groupby("name")["rank"].transform("max")]
    e = top.groupby("name").agg(energy_rank=(col, "median"), r=("rank", "max")).reset_index()
    e["energy_source"] = "lora r=" + e["r"].astype(int).astype(str)
    e["energy_bound"] = e["energy_rank"] >= e["r"]
    return e.drop(columns="r")


def phi_evidence(convergence: pd.DataFrame | None, shapes: pd.DataFrame, *,
                 side: str = PHI_SIDE) -> pd.DataFrame:
    """Per module: directions shared beyond chance by neighbouring LoRA ranks (see module doc).

    Returns:
        ``name, shared_dims, phi_rank`` (phi_rank NaN when fewer than half a direction is shared).
    """
    col = f"phi_next_{side}"
    if convergence is None or col not in convergence or convergence[col].isna().all():
        return pd.DataFrame(columns=["name", "shared_dims", "phi_rank"])
    c = convergence.dropna(subset=[col]).groupby(["name", "rank"])[col].median().reset_index()
    c = c.merge(shapes[["name", "d_out", "d_in"]], on="name")
    n = c["d_out"] if side == "left" else c["d_in"]
    r = c["rank"].astype(float)
    c["dims"] = np.where(r < n, r * (c[col] - r / n) / (1 - r / n), np.nan)
    out = c.groupby("name")["dims"].max().reset_index(name="shared_dims")
    out["phi_rank"] = [pow2_ceil(round(d)) if d >= 0.5 else np.nan for d in out["shared_dims"]]
    return out


def knee(metrics: pd.DataFrame | None, *, share: float = KNEE_SHARE) -> dict:
    """The smallest LoRA rank on the plateau of the metric vs r (see module doc).

    Returns:
        ``{"rank", "at_edge", "ranks", "metric"}``; rank None without LoRA runs or gain.
        at_edge: the knee is the largest rank tested, so the metric may still be rising.
    """
    if metrics is None or not (metrics["method"] == "lora").any():
        return {"rank": None, "at_edge": False, "ranks": [], "metric": None}
    key, higher = metric_name(metrics)
    t = metric_by_rank(metrics)
    lora = t[t["method"] == "lora"].sort_values("rank")
    gain = (lora["mean"] - lora["before"]) * (1 if higher else -1)
    ranks = [int(r) for r in lora["rank"]]
    best = int(np.argmax(gain.to_numpy()))
    if gain.iloc[best] <= 0:
        return {"rank": None, "at_edge": False, "ranks": ranks, "metric": key}
    # the first rank within tolerance of the best; the best itself always is, so i <= best
    i = next(i for i in range(len(ranks)) if gain.iloc[best] - gain.iloc[i] <= max(
        (1 - share) * gain.iloc[best], math.hypot(lora["std"].iloc[i], lora["std"].iloc[best])))
    return {"rank": ranks[i], "at_edge": i == len(ranks) - 1, "ranks": ranks, "metric": key}


def truncation_rank(summary: pd.DataFrame | None, curve: pd.DataFrame | None = None, *,
                    share: float = TRUNC_SHARE) -> dict:
    """The full update's functional rank at ``share`` of the gain (median over seeds).

    Returns:
        ``{"rank", "reached"}``: rank None without a truncation test; reached False when the
        share was kept only at the update's full rank (from ``curve``, the truncation table);
        ``no_gain`` True when full fine-tuning did not improve the metric at all.
    """
    if summary is None or summary.empty:
        return {"rank": None, "reached": None}
    full = summary[(summary["method"] == "full") & np.isclose(summary["share"], share)]
    if full.empty:
        return {"rank": None, "reached": None}
    top = {} if curve is None or curve.empty else \
        curve[curve["is_full_rank"].astype(bool)].set_index("run")
    if len(top) and "metric" in top:       # full fine-tuning made the metric worse: no gain to keep
        key = top["metric"].iloc[0]
        sign = 1 if key == "accuracy" else -1
        if (sign * (top[f"eval_{key}"] - top[f"before_{key}"]) <= 0).any():
            return {"rank": None, "reached": None, "no_gain": True}
    top = top["k"].to_dict() if len(top) else {}
    if full["k"].isna().any() or any(k >= top.get(r, np.inf) for r, k in zip(full["run"], full["k"])):
        return {"rank": None, "reached": False}
    return {"rank": int(pow2_ceil(full["k"].median())), "reached": True}


# ------------------------------------------------------------------------ combination

def combine(e: dict, *, max_rank: int) -> tuple[int, str, str]:
    """One module's rank, confidence and reason from its evidence (NaN/None: absent).

    Args:
        e: ``energy, phi, knee, truncation`` ranks, and ``knee_at_edge``, ``energy_bound``.
        max_rank: min(d_out, d_in) of the module.
    Raises:
        InputError: no evidence at all.
    """
    have = {k: int(e[k]) for k in EVIDENCE if e.get(k) is not None and not pd.isna(e[k])}
    functional = max((have[k] for k in ("knee", "truncation") if k in have), default=None)
    structural = have.get("phi", have.get("energy"))
    parts = [p for p in (structural, functional) if p is not None]
    if not parts:
        raise InputError(f"no evidence for a rank of {e.get('name')}: the sweep needs a full "
                         "run or LoRA runs")
    r = max(1, min(min(parts), max_rank))
    agree = {k: (r / 2 <= v <= 2 * r) or (k in ("knee", "truncation") and v >= r)
             for k, v in have.items()}
    n, a = len(have), sum(agree.values())
    if n >= 3 and a == n and not e.get("knee_at_edge"):
        conf = "high"
    elif a >= 2 and a >= n - 1:
        conf = "medium"
    else:
        conf = "low"
    notes = {"energy": f"k{TAU} of ΔW → {have.get('energy')}" + (" (≥: capped by the LoRA rank)"
                                                                 if e.get("energy_bound") else ""),
             "phi": f"{have.get('phi')} dir. shared by neighbouring ranks",
             "knee": f"metric knee r = {have.get('knee')}" + (" (still rising)"
                                                              if e.get("knee_at_edge") else ""),
             "truncation": f"truncation keeps {TRUNC_SHARE:.0%} of the gain at k = "
                           f"{have.get('truncation')}"}
    shown = "; ".join(notes[k] + ("" if agree[k] else " ✗") for k in have)
    name = "φ" if "phi" in have else "energy"
    rule = (f"min({name}, functional)" if len(parts) == 2 else
            f"{name} rank only" if structural is not None else "functional rank only")
    return r, conf, f"{shown}. r = {r} by {rule}; {a}/{n} agree within ×2"


def evidence_table(frames: dict[str, pd.DataFrame], *,
                   targets: tuple[str, ...] | None = None) -> tuple[pd.DataFrame, dict]:
    """Every module's evidence and recommended rank: one row per module, ids first.

    Returns:
        ``(table, global)``: columns ``layer, module, name, d_out, d_in, r, params, confidence,
        energy_rank_90, energy_source, r_energy, shared_dims, r_phi, r_knee, r_truncation,
        reason``; global holds the knee and truncation results.
    Raises:
        InputError: no modules table, or no evidence.
    """
    mods = frames.get("modules")
    if mods is None or mods.empty:
        raise InputError("the results have no modules.csv: run `rankscope compare` first")
    t = candidates(mods, targets=targets)
    energy = energy_evidence(mods)
    t = t.merge(energy, on="name", how="left").merge(
        phi_evidence(frames.get("convergence"), t), on="name", how="left")
    k = knee(frames.get("metrics"))
    tr = truncation_rank(frames.get("truncation_summary"), frames.get("truncation"))
    rows = []
    for _, row in t.iterrows():
        e = {"name": row["name"], "phi": row["phi_rank"], "knee": k["rank"],
             "truncation": tr["rank"], "knee_at_edge": k["at_edge"],
             "energy": pow2_ceil(row["energy_rank"]) if pd.notna(row["energy_rank"]) else None,
             "energy_bound": bool(row["energy_bound"]) if pd.notna(row["energy_bound"]) else False}
        r, conf, reason = combine(e, max_rank=int(min(row["d_out"], row["d_in"])))
        rows.append({"layer": row["layer"], "module": row["module"], "name": row["name"],
                     "d_out": int(row["d_out"]), "d_in": int(row["d_in"]), "r": r,
                     "params": r * int(row["d_out"] + row["d_in"]), "confidence": conf,
                     f"energy_rank_{TAU}": row["energy_rank"], "energy_source": row["energy_source"],
                     "r_energy": e["energy"], "shared_dims": row["shared_dims"],
                     "r_phi": row["phi_rank"], "r_knee": k["rank"], "r_truncation": tr["rank"],
                     "reason": reason})
    table = pd.DataFrame(rows)
    for c in ("layer", "r_energy", "r_phi", "r_knee", "r_truncation"):
        table[c] = pd.to_numeric(table[c]).astype("Int64")
    return table, {"knee": k, "truncation": tr}


# ------------------------------------------------------------------- budget allocation

def module_spectra(spectra: pd.DataFrame, names) -> dict[str, np.ndarray]:
    """σ (descending) per module: of the full update (mean σ² over seeds), else the largest
    LoRA run's."""
    spectra = spectra[spectra["name"].isin(set(names))]
    full = spectra[spectra["method"] == "full"]
    if full.empty:
        lora = spectra[spectra["method"] == "lora"]
        full = lora[lora["rank"] == lora.groupby("name")["rank"].transform("max")]
    s2 = full.assign(s2=full["sigma"] ** 2).groupby(["name", "index"])["s2"].mean()
    return {n: np.sqrt(np.sort(g.to_numpy())[::-1]) for n, g in s2.groupby(level="name")}


def allocate(sigmas: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]],
             budget: int) -> dict[str, int]:
    """Ranks maximising Σ_modules (explained energy share) within ``budget`` parameters.

    Greedy over single directions by σ_{k+1}²/Σσ² / (d_out + d_in); a module whose next
    direction no longer fits is passed over so that cheaper ones can still use the rest.

    Args:
        sigmas: {module: (n,) singular values, descending}.
        shapes: {module: (d_out, d_in)}.
        budget: trainable LoRA parameters.
    Returns:
        {module: rank ≥ 0}, Σ rank·(d_out + d_in) ≤ budget.
    Raises:
        InputError: the budget is smaller than the cheapest rank-1 adapter.
    """
    cost = {n: sum(shapes[n]) for n in sigmas}
    cheapest = min(cost, key=cost.get)
    if budget < cost[cheapest]:
        raise InputError(f"budget {budget:,} parameters is smaller than one rank-1 adapter "
                         f"({cost[cheapest]:,} parameters for {cheapest})")
    share = {n: (s ** 2) / max(float((s ** 2).sum()), 1e-300) for n, s in sigmas.items()}
    limit = {n: min(len(s), min(shapes[n])) for n, s in sigmas.items()}
    heap = [(-share[n][0] / cost[n], n) for n in sigmas if limit[n] and share[n][0] > 0]
    heapq.heapify(heap)
    ranks, left = dict.fromkeys(sigmas, 0), budget
    while heap:
        _, n = heapq.heappop(heap)
        if cost[n] > left:
            continue
        ranks[n] += 1
        left -= cost[n]
        k = ranks[n]
        if k < limit[n] and share[n][k] > 0:
            heapq.heappush(heap, (-share[n][k] / cost[n], n))
    return ranks
