"""The tidy data behind each paper figure, built from results tables.

A figure's data is one DataFrame: column ``plot`` names the plot function of ``plots.PLOTS``
that draws a row's panel and ``panel`` the panel's title; the rest are that function's
inputs. ``plots.draw_figure`` lays the panels out in order of appearance, so a figure is
re-drawn from its CSV alone. Each builder takes ``results`` = {sweep label: {table name: DataFrame}}
(the tables of ``results.load_tables``) and keyword-only settings from an experiment YAML.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from rankscope.errors import InputError
from rankscope.outputs.figure_subspace import subspace_ranks, subspace_seeds
from rankscope.outputs.figure_tables import mid_layer, need_table, one_sweep, panels
from rankscope.outputs.plots import FLOORS, OVERALL as ALL
from rankscope.analysis.equivalence import against_rank
from rankscope.analysis.verdict import declared_margin, loss_gain, metric_name


def _metric_rows(label: str, tables: dict, key: str) -> list[pd.DataFrame]:
    m = need_table(tables, "metrics", "metric vs r")
    if f"after_{key}" not in m:
        raise InputError(f"metric vs r: the runs have no held-out {key} (they have "
                         f"{', '.join(c.removeprefix('after_') for c in m if c.startswith('after_'))})")
    ids, after = ["method", "rank", "seed"], m[f"after_{key}"]
    # each selection takes its own rows' values: assigning the whole column to an empty
    # selection (a sweep without full runs) would make a row of it for every run
    lora = m.loc[m["method"] == "lora", ids].assign(series=label,
                                                     value=after[m["method"] == "lora"])
    top = vs_top_rank(m, tables.get("examples"), key)
    if len(top):                # runs without per-example numbers have no equivalence columns
        lora = lora.merge(top.astype({"rank": lora["rank"].dtype}), on="rank", how="left")
    full = m.loc[m["method"] == "full", ids].assign(series="full fine-tuning",
                                                     value=after[m["method"] == "full"])
    base = pd.DataFrame({"method": ["base"], "series": ["base model"],
                         "value": [float(m[f"before_{key}"].mean())]})
    return [lora, full, base]


def vs_top_rank(metrics: pd.DataFrame, examples: pd.DataFrame | None, key: str) -> pd.DataFrame:
    """Each LoRA rank against the sweep's largest one by the equivalence test
    (``analysis.equivalence``): is the curve flat, within the margin the sweep fixed before its
    runs? The margin is in accuracy points, or for loss a share of the largest rank's gain over
    the base model (``verdict.loss_gain``).

    Returns:
        Per rank below the largest: ``vs_top`` (equivalent, better, worse, inconclusive),
        ``vs_top_lo``, ``vs_top_hi`` (the 90% interval of rank − largest), ``vs_top_margin``
        and ``equivalent_top`` (1.0 or 0.0); no rows without per-example numbers.
    """
    cols = ["rank", "vs_top", "vs_top_lo", "vs_top_hi", "vs_top_margin", "equivalent_top"]
    col = "correct" if key == "accuracy" else "loss"
    lora = examples[examples["method"] == "lora"] if examples is not None and len(examples) \
        else pd.DataFrame()
    if lora.empty or col not in lora or lora[col].isna().all() or lora["rank"].nunique() < 2:
        return pd.DataFrame(columns=cols)
    top = int(lora["rank"].max())
    share = declared_margin(metrics)[1]
    margin = share if col == "correct" else share * loss_gain(examples, reference=top)
    scan = against_rank(examples, top, metric=col, higher=col == "correct", margin=margin)
    return pd.DataFrame({"rank": scan["rank"], "vs_top": scan["status"], "vs_top_lo": scan["lo"],
                         "vs_top_hi": scan["hi"], "vs_top_margin": scan["margin"],
                         "equivalent_top": (scan["status"] == "equivalent").astype(float)})


def metric_rank(results, *, panel: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """Hu et al. Tables 6 / 18: the held-out metric vs r for each sweep, full and base as lines.

    Args:
        panel: the panel's title; ``{}`` in it names the metric.
        metric: the held-out quantity drawn: ``loss`` (every task has it), or by default the
            task's own metric (accuracy for classification, loss otherwise).
    """
    key = metric or metric_name(need_table(one_sweep(results), "metrics", "metric vs r"))[0]
    rows = [r for label, tables in results.items() for r in _metric_rows(label, tables, key)]
    df = pd.concat(rows, ignore_index=True)
    df = df.drop_duplicates(subset=["method", "series", "rank", "seed", "value"])
    title = (panel or "held-out {} vs LoRA rank").replace("{}", key)
    return panels([df.assign(plot="metric_vs_rank", panel=title, quantity=f"held-out {key}")])


def alpha_policies(results, *, metric: str | None = None) -> pd.DataFrame:
    """The α policies side by side: the held-out metric vs r, and ‖ΔW_r‖_F (median module) vs
    r, one line per sweep (policy); α = 2r ties a larger rank to a larger step, fixed α to a
    smaller one, rsLoRA (s = α/√r) lies between."""
    rows = []
    for label, tables in results.items():
        m = need_table(tables, "metrics", "‖ΔW‖ vs r")
        lora = m[m["method"] == "lora"]
        rows.append(lora[["method", "rank", "seed"]].assign(series=label,
                                                            value=lora["delta_fro_median"]))
    # no full fine-tuning line: its median runs over every linear module, LoRA's over its targets
    fro = pd.concat(rows, ignore_index=True).drop_duplicates(
        subset=["method", "series", "rank", "seed", "value"]).assign(
        plot="convergence_curves", panel=r"$\|\Delta W_r\|_F$ vs r, by α policy",
        quantity=r"$\|\Delta W\|_F$ (median module)")
    return panels([metric_rank(results, metric=metric, panel="held-out {} vs r, by α policy"),
                    fro])


def _by_module(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """Per run: the median of ``col`` over layers for each module, and over all ("all modules")."""
    ids = ["method", "rank", "seed"]
    per = df.groupby(ids + ["module"], dropna=False)[col].median().reset_index()
    per = per.rename(columns={"module": "series", col: "value"})
    overall = df.groupby(ids, dropna=False)[col].median().reset_index()
    overall = overall.rename(columns={col: "value"}).assign(series=ALL)
    return pd.concat([per, overall], ignore_index=True)


# Column of the convergence table: (panel title, y label, {figure column: its null's column}).
# The scale-free measures first, each with its null; the distance last: it reads the rates.
CONVERGENCE = {
    "fro_cos": ("Frobenius cosine with the full update",
                r"$\cos_F(\Delta W_r, \Delta W_{\rm full})$",
                {"null_q99": "fro_cos_null_q99"}),
    "phi_full_{side}": ("top-r directions shared with full",
                        r"$\phi(\Delta W_r, \Delta W_{\rm full})$",
                        {"null_q95": "phi_full_{side}_null_q95",
                         "null_q99": "phi_full_{side}_null_q99"}),
    "energy_share": ("energy of ΔW_full in the column space of ΔW_r",
                     r"share of $\|\Delta W_{\rm full}\|_F^2$",
                     {"null_mean": "energy_share_null", "null_q99": "energy_share_null_q99"}),
    "phi_next_{side}": ("neighbouring ranks r, r′",
                        r"$\phi(\Delta W_r, \Delta W_{r'})$",
                        {"null_q95": "phi_next_{side}_null_q95",
                         "null_q99": "phi_next_{side}_null_q99"}),
    "rel_dist": ("distance to the full update (scale-bound)",
                 r"$\|\Delta W_r - \Delta W_{\rm full}\|_F \,/\, \|\Delta W_{\rm full}\|_F$",
                 {}),
}


def convergence(results, *, side: str = "right") -> pd.DataFrame:
    """Convergence as r grows: the metric, then each measure of CONVERGENCE, per module and all.

    Each row carries its null like its value (``null_mean``, ``null_q95``, ``null_q99``: the
    median over layers, or over modules for "all modules"), so that a check compares a row with
    its own null; ``excess`` = value − null_mean where there is a mean (the energy share over
    chance, whose growth with r is not chance's own r/d_out).
    """
    tables = one_sweep(results)
    conv = need_table(tables, "convergence", "the convergence figure")
    rows = [metric_rank({"LoRA": tables})]
    for col, (title, label, nulls) in CONVERGENCE.items():
        col = col.format(side=side)
        if col not in conv or conv[col].isna().all():
            continue
        have = conv.dropna(subset=[col])
        d = _by_module(have, col)
        for out, src in nulls.items():   # the same groups in the same order as d's
            src = src.format(side=side)
            if src in have:
                d[out] = _by_module(have, src)["value"].to_numpy()
        if "null_mean" in d:
            d["excess"] = d["value"] - d["null_mean"]
        rows.append(d.assign(plot="convergence_curves", panel=title, quantity=label))
    return panels(rows)


def relation(results, *, layer: int | None = None,
             modules: list[str] | None = None) -> pd.DataFrame:
    """Hu et al. Table 7: ‖UᵀWV‖_F for ΔW's, W's and random top-r directions, and amplification.

    Every bar row carries its run's ``w_own`` (‖UᵀWV‖_F on W's own top-r directions) and
    ``random_q99`` (the 99% quantile of random directions'), so that ΔW's bar is compared with
    both rank by rank; every amplification row carries ``within_noise`` (ΔW's ‖UᵀWV‖_F not above
    ``random_q99``: its amplification is that of a random direction, no evidence).
    """
    rel = need_table(one_sweep(results), "relation", "ΔW vs W")
    lora = rel[rel["method"] == "lora"]
    if lora.empty:
        raise InputError("ΔW vs W needs LoRA runs in the relation table")
    lay = mid_layer(lora, layer)
    at = lora[lora["layer"] == lay].assign(w_own=lambda d: d["w_dirs"])
    if "random_q99" in at:          # as the relation table's amplification_within_noise
        at = at.assign(within_noise=~(at["delta_dirs"] > at["random_q99"]))
    modules = list(modules or dict.fromkeys(at["module"]))
    names = {"delta_dirs": "ΔW's top-r", "w_dirs": "W's top-r",
             "random_expected": "random (expected)"}
    ids = [c for c in ("rank", "seed", "module", "layer", "w_fro", "w_own", "random_q99")
           if c in at]
    rows = []
    for m in modules:
        d = at[at["module"] == m].melt(id_vars=ids, value_vars=list(names), var_name="directions")
        d["directions"] = d["directions"].map(names)
        rows.append(d.assign(plot="relation_bars", panel=f"W = {m}, layer {lay}",
                             quantity=r"$\|U^\top W V\|_F$"))
    amp = at[at["module"].isin(modules)].rename(columns={"module": "series",
                                                         "amplification": "value"})
    keep = [c for c in ("method", "rank", "seed", "series", "value", "delta_dirs", "random_q99",
                        "within_noise") if c in amp]
    rows.append(amp[keep].assign(
        plot="convergence_curves", panel=f"amplification, layer {lay}",
        quantity=r"amplification $\|\Delta W\|_F \,/\, \|U^\top W V\|_F$"))
    return panels(rows)


def intruders(results, *, eps: list[float] | None = None, eps_module: float = 0.5,
              modules: list[str] | None = None) -> pd.DataFrame:
    """Shuttleworth et al.: intruder dimensions per module vs r for several ε, and per module."""
    t = need_table(one_sweep(results), "intruders", "the intruder figure")
    modules = list(modules or dict.fromkeys(t[t["method"] == "lora"]["module"]))
    t = t[t["module"].isin(modules)]        # full runs: only the modules LoRA adapts
    if t.empty:
        raise InputError("the intruder figure needs LoRA runs (it counts on the modules LoRA adapts)")
    k = int(t["k"].max())
    ids = ["method", "rank", "seed", "eps"]
    eps = eps or sorted(t["eps"].unique())
    per_eps = t[t["eps"].isin(eps)].groupby(ids, dropna=False)["count"].mean().reset_index()
    per_eps = per_eps.assign(series=[f"ε = {e:g}" for e in per_eps["eps"]])
    at = t[np.isclose(t["eps"], eps_module)]
    if at.empty:
        raise InputError(f"eps_module {eps_module} is not among the intruder ε values")
    per_mod = at.groupby(ids + ["module"], dropna=False)["count"].mean().reset_index()
    per_mod = per_mod.rename(columns={"module": "series"})
    q = f"intruders in top {k}, per module"
    return panels([
        per_eps.rename(columns={"count": "value"}).assign(
            plot="intruder_counts", panel="intruder dimensions vs r, by ε", quantity=q),
        per_mod.rename(columns={"count": "value"}).assign(
            plot="intruder_counts", panel=f"by module, ε = {eps_module:g}", quantity=q)])


HEAD_PARTS = {"pooler", "classifier", "score", "lm_head"}     # outside the transformer blocks


def module_group(name: str) -> str:
    """``attention`` for a module under an attention block, ``head`` for a pooler or task head
    (outside the blocks, so in neither of Biderman et al.'s groups), else ``MLP``."""
    if any(s in name for s in ("attn", "attention")):
        return "attention"
    return "head" if HEAD_PARTS & set(name.split(".")) else "MLP"


# The energy figure's noise floors, by column of the modules table: their rows' ``group``
# (``module`` names the module whose floor it is; plots.FLOORS says how each is drawn).
ENERGY_FLOORS = dict(zip(("energy_rank_90_noise", "energy_rank_90_seeddiff"), FLOORS))


def energy(results, *, tau: int = 90, lora_rank: int = 16) -> pd.DataFrame:
    """Biderman et al.: the full update's energy rank k_τ by layer and module (attention vs MLP).

    Each by-layer row carries k_τ relative to its module: ``share_of_min_d`` = k_τ / min(d_out,
    d_in) and, for τ = 90, ``share_of_floor`` = k₉₀ / the k₉₀ of a Gaussian matrix of its shape
    (``energy_rank_90_noise``), so that widths compare.
    """
    mods = need_table(one_sweep(results), "modules", "the energy-rank figure")
    full = mods[mods["method"] == "full"]
    if full.empty:
        raise InputError("the energy-rank figure needs a full fine-tuning run")
    full = full.assign(group=full["name"].map(module_group))
    ref = pd.DataFrame({"module": [f"LoRA r = {lora_rank}"], "group": ["reference"],
                        "value": [float(lora_rank)]})
    if tau == 90:       # the noise floors k₉₀ is read against (docs/science.md), per module
        ref = pd.concat([ref] + [pd.DataFrame({
            "module": [m], "group": [group], "value": [float(v)]})
            for col, group in ENERGY_FLOORS.items() if col in full
            for m, v in full.groupby("module")[col].median().dropna().items()])
    k = pd.to_numeric(full[f"energy_rank_{tau}"], errors="coerce")
    by_layer = full[["layer", "module", "group", "seed"]].assign(value=k)
    if {"d_out", "d_in"} <= set(full):
        by_layer["share_of_min_d"] = k / np.minimum(full["d_out"], full["d_in"]).astype(float)
    if tau == 90 and "energy_rank_90_noise" in full:
        by_layer["share_of_floor"] = k / pd.to_numeric(full["energy_rank_90_noise"],
                                                       errors="coerce")
    taus = [c for c in ("energy_rank_50", "energy_rank_90", "energy_rank_99") if c in full]
    bars = full.groupby(["group", "module"])[taus].median().reset_index().melt(
        id_vars=["group", "module"], value_vars=taus, var_name="tau")
    bars["tau"] = "$k_{" + bars["tau"].str.rsplit("_", n=1).str[1] + "}$"
    return panels([
        pd.concat([by_layer, ref]).assign(
            plot="energy_rank", panel=f"energy rank of the full update, τ = {tau / 100:g}",
            quantity=f"energy rank $k_{{{tau}}}$"),
        pd.concat([bars, ref]).assign(plot="energy_rank_bars", panel="median over layers",
                                      quantity="energy rank")])


def energy_shares(spectra: pd.DataFrame, ks) -> pd.DataFrame:
    """Σ_{i≤k} σ_i² / Σ σ_i² of each module at each k, the median over modules per run.

    Modules whose update is zero (not trained: ``full_scope: targets`` leaves the others at
    W₀) have no energy to share and are left out."""
    out = []
    for run, g in spectra.groupby("run", sort=False):
        shares = []
        for _, s in g.groupby("name", sort=False):
            e = np.concatenate([[0.0], np.cumsum(np.sort(s["sigma"].to_numpy())[::-1] ** 2)])
            if e[-1] > 0:
                shares.append([e[min(k, len(e) - 1)] / e[-1] for k in ks])  # k = 0 keeps nothing
        if not shares:
            continue
        med = np.median(np.array(shares), axis=0)
        out.append(pd.DataFrame({"run": run, "k": list(ks), "value": med}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["run", "k", "value"])


def _median_min_d(tables: dict) -> float:
    """The median over the full runs' updated modules of min(d_out, d_in) (NaN without them)."""
    mods = tables.get("modules")
    if mods is None or mods.empty or not {"d_out", "d_in", "method"} <= set(mods):
        return np.nan
    full = mods[mods["method"] == "full"]
    return float(np.minimum(full["d_out"], full["d_in"]).median()) if len(full) else np.nan


def truncation(results) -> pd.DataFrame:
    """The truncation test: gain share of W_0 + trunc_k(ΔW) vs k, beside ΔW_full's energy share.

    Every row carries ``k_share`` = k / the median module's min(d_out, d_in), so that a
    "small k" reads the same on models of any width."""
    tables = one_sweep(results)
    curve = need_table(tables, "truncation", "the truncation figure")
    k0 = curve.loc[curve["k"] == 0, "k0_share"] if "k0_share" in curve else pd.Series(dtype=float)
    base = f" (k = 0 baseline: {k0.median():.0%} of the gain)" if k0.notna().any() else ""
    curve = curve[curve["k"] > 0]                       # shares are measured from k = 0
    gain = curve[["run", "k", "gain_share"]].rename(columns={"gain_share": "value"})
    gain = gain.assign(curve="gain share, " + gain["run"])
    rows = [gain]
    spectra = tables.get("spectra")
    if spectra is not None:
        full = spectra[spectra["method"] == "full"]
        if len(full):
            kmax = int(curve["k"].max())
            ks = sorted({int(k) for k in curve["k"]} | {2 ** p for p in range(int(np.log2(kmax)) + 1)})
            e = energy_shares(full, ks)
            rows.append(e.groupby("k")["value"].mean().reset_index().assign(
                curve=r"energy share of $\Delta W_{\rm full}$ (median module)"))
    df = pd.concat(rows, ignore_index=True)
    return panels([df.assign(
        k_share=df["k"] / _median_min_d(tables), plot="truncation_curve",
        panel=r"truncation test: $W_0 + {\rm trunc}_k(\Delta W)$" + base)])


def rank_tokens(results) -> pd.DataFrame:
    """Biderman et al.: k₉₀ of the update against the training tokens behind it, full
    fine-tuning by module group (median over modules and seeds) and LoRA by rank, each full
    group's Gaussian k₉₀ floor beside it (``analysis.snapshots``)."""
    t = need_table(one_sweep(results), "snapshots", "rank vs tokens (a sweep trained with snapshots)")
    if t.empty:
        raise InputError("rank vs tokens needs a sweep trained with snapshots (config "
                         "'snapshots': shares of the steps)")
    full = t[t["method"] == "full"]
    group = full["name"].map(module_group)                  # the blocks' modules: Biderman's groups
    full = full[group != "head"].assign(series="full fine-tuning, " + group, order=0)
    lora = t[t["method"] == "lora"]
    lora = lora.assign(series=["LoRA r = %d" % r for r in lora["rank"]], order=lora["rank"])
    keys = ["order", "series", "method", "rank", "tokens", "share"]    # full, then LoRA by r
    lines = pd.concat([full, lora]).groupby(keys, dropna=False).agg(
        value=("k90", "median"), fro=("fro", "median")).reset_index().drop(columns="order")
    floor = full.groupby("series")["noise_k90"].median().reset_index()
    floor = floor.assign(series="Gaussian k₉₀ floor, " + floor["series"].str.rsplit(", ", n=1).str[1],
                         method="floor", value=floor["noise_k90"]).drop(columns="noise_k90")
    return panels([pd.concat([lines, floor], ignore_index=True).assign(
        plot="rank_vs_tokens", panel=r"energy rank $k_{90}$ of $\Delta W$ as training goes on",
        quantity=r"$k_{90}$ (median module)")])


BUILDERS = {f.__name__: f for f in (subspace_ranks, subspace_seeds, metric_rank, convergence,
                                     relation, intruders, energy, truncation, rank_tokens,
                                     alpha_policies)}
