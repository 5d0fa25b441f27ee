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
from rankscope.outputs.plots import FLOORS, OVERALL as ALL
from rankscope.analysis.verdict import metric_name



def _one(results: dict) -> dict[str, pd.DataFrame]:
    return next(iter(results.values()))


def _table(tables: dict, name: str, what: str) -> pd.DataFrame:
    df = tables.get(name)
    if df is None or df.empty:
        raise InputError(f"{what} needs the {name} table, which the results lack or is empty")
    return df


def _mid_layer(df: pd.DataFrame, layer: int | None) -> int:
    layers = sorted(int(x) for x in df["layer"].dropna().unique())
    if layer is None:
        return layers[len(layers) // 2]
    if layer not in layers:
        raise InputError(f"layer {layer} is not in the results (layers: {layers})")
    return layer


def _panels(rows: list[pd.DataFrame]) -> pd.DataFrame:
    front = ["plot", "panel"]
    df = pd.concat(rows, ignore_index=True)
    return df[front + [c for c in df.columns if c not in front]]


SPACES = {"left": ("B", "column space (B)"), "right": ("A", "row space (A)")}
MOVED = 0.5         # below this ‖A − A₀‖/‖A₀‖, A's row space is still mostly its random init


def _grids(results, pair: str, *, side: str, layer: int | None, modules):
    g = _table(_one(results), "subspace_grid", "a φ(i, j) heatmap")
    g = g[(g["pair"] == pair) & (g["side"] == side)]
    if "basis" in g:        # one trained basis per side (A, not A − A₀, on the row space)
        g = g[g["basis"].isin([SPACES[side][0], "random"]) | (g["source"] != "trained")]
    if g.empty:
        raise InputError(f"no φ(i, j) grid for a pair of {pair} on the {side} side: the sweep "
                         f"needs {'two ranks' if pair == 'ranks' else 'two seeds at its top rank'}")
    g = g[g["layer"] == _mid_layer(g, layer)]
    modules = list(modules or dict.fromkeys(g["module"]))
    cols = [c for c in ("module", "layer", "side", "source", "rank_1", "rank_2", "seed_1",
                        "seed_2", "i", "j", "phi", "null_q99", "a_moved") if c in g]
    return g[cols], modules


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
                   modules: list[str] | None = None, zoom: int = 8, side: str | None = None
                   ) -> pd.DataFrame:
    """Hu et al. Figure 3: φ(ΔW_{r1}, ΔW_{r2}, i, j) of one seed on the column space (B) and the
    row space (A), whole and zoomed (i, j ≤ zoom); each title carries φ(1, 1), its null's 99%
    quantile and, on the row space, how far A moved from its initialisation. ``side`` (one
    side only) is kept for experiment files that name it."""
    panels = []
    for sd in ((side,) if side else sides):
        g, mods = _grids(results, "ranks", side=sd, layer=layer, modules=modules)
        g = g[g["source"] == "trained"]
        for m in mods:
            gm = g[g["module"] == m]
            r1, r2, lay = int(gm["rank_1"].iloc[0]), int(gm["rank_2"].iloc[0]), int(gm["layer"].iloc[0])
            z, where = min(zoom, r1), f"{SPACES[sd][1]} of ΔW {m}, layer {lay}"
            panels.append(gm.assign(plot="subspace_heatmap",
                                    panel=f"{where}: r = {r1} vs {r2}\n{_evidence(gm, sd)}"))
            panels.append(gm[(gm["i"] <= z) & (gm["j"] <= z)].assign(
                plot="subspace_heatmap", panel=f"{where}: i, j ≤ {z}"))
    return _panels(panels)


def subspace_seeds(results, *, sides=("left", "right"), layer: int | None = None,
                   modules: list[str] | None = None, side: str | None = None) -> pd.DataFrame:
    """Hu et al. Figure 4: φ(i, j) between two seeds at the top rank on both spaces (titles as
    in ``subspace_ranks``), and two random subspaces of the same sizes."""
    rows = []
    for sd in ((side,) if side else sides):
        g, mods = _grids(results, "seeds", side=sd, layer=layer, modules=modules)
        for m in mods:
            gm = g[(g["module"] == m) & (g["source"] == "trained")]
            s1, s2, r = int(gm["seed_1"].iloc[0]), int(gm["seed_2"].iloc[0]), int(gm["rank_1"].iloc[0])
            rows.append(gm.assign(plot="subspace_heatmap", panel=(
                f"{SPACES[sd][1]} of ΔW {m}, layer {int(gm['layer'].iloc[0])}: seeds {s1} vs "
                f"{s2}, r = {r}\n{_evidence(gm, sd)}")))
    rnd = g[(g["module"] == mods[0]) & (g["source"] == "random")]
    rows.append(rnd.assign(plot="subspace_heatmap", panel="two random subspaces, same sizes"))
    return _panels(rows)


def _metric_rows(label: str, tables: dict, key: str) -> list[pd.DataFrame]:
    m = _table(tables, "metrics", "metric vs r")
    if f"after_{key}" not in m:
        raise InputError(f"metric vs r: the runs have no held-out {key} (they have "
                         f"{', '.join(c.removeprefix('after_') for c in m if c.startswith('after_'))})")
    ids, after = ["method", "rank", "seed"], m[f"after_{key}"]
    # each selection takes its own rows' values: assigning the whole column to an empty
    # selection (a sweep without full runs) would make a row of it for every run
    lora = m.loc[m["method"] == "lora", ids].assign(series=label,
                                                     value=after[m["method"] == "lora"])
    full = m.loc[m["method"] == "full", ids].assign(series="full fine-tuning",
                                                     value=after[m["method"] == "full"])
    base = pd.DataFrame({"method": ["base"], "series": ["base model"],
                         "value": [float(m[f"before_{key}"].mean())]})
    return [lora, full, base]


def metric_rank(results, *, panel: str | None = None, metric: str | None = None) -> pd.DataFrame:
    """Hu et al. Tables 6 / 18: the held-out metric vs r for each sweep, full and base as lines.

    Args:
        panel: the panel's title; ``{}`` in it names the metric.
        metric: the held-out quantity drawn: ``loss`` (every task has it), or by default the
            task's own metric (accuracy for classification, loss otherwise).
    """
    key = metric or metric_name(_table(_one(results), "metrics", "metric vs r"))[0]
    rows = [r for label, tables in results.items() for r in _metric_rows(label, tables, key)]
    df = pd.concat(rows, ignore_index=True)
    df = df.drop_duplicates(subset=["method", "series", "rank", "seed", "value"])
    title = (panel or "held-out {} vs LoRA rank").replace("{}", key)
    return _panels([df.assign(plot="metric_vs_rank", panel=title, quantity=f"held-out {key}")])


def alpha_policies(results, *, metric: str | None = None) -> pd.DataFrame:
    """The α policies side by side: the held-out metric vs r, and ‖ΔW_r‖_F (median module) vs
    r, one line per sweep (policy); α = 2r ties a larger rank to a larger step, fixed α to a
    smaller one, rsLoRA (s = α/√r) lies between."""
    rows = []
    for label, tables in results.items():
        m = _table(tables, "metrics", "‖ΔW‖ vs r")
        lora = m[m["method"] == "lora"]
        rows.append(lora[["method", "rank", "seed"]].assign(series=label,
                                                            value=lora["delta_fro_median"]))
    # no full fine-tuning line: its median runs over every linear module, LoRA's over its targets
    fro = pd.concat(rows, ignore_index=True).drop_duplicates(
        subset=["method", "series", "rank", "seed", "value"]).assign(
        plot="convergence_curves", panel=r"$\|\Delta W_r\|_F$ vs r, by α policy",
        quantity=r"$\|\Delta W\|_F$ (median module)")
    return _panels([metric_rank(results, metric=metric, panel="held-out {} vs r, by α policy"),
                    fro])


def _by_module(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """Per run: the median of ``col`` over layers for each module, and over all ("all modules")."""
    ids = ["method", "rank", "seed"]
    per = df.groupby(ids + ["module"], dropna=False)[col].median().reset_index()
    per = per.rename(columns={"module": "series", col: "value"})
    overall = df.groupby(ids, dropna=False)[col].median().reset_index()
    overall = overall.rename(columns={col: "value"}).assign(series=ALL)
    return pd.concat([per, overall], ignore_index=True)


CONVERGENCE = {       # column of the convergence table: (panel title, y label)
    "rel_dist": ("distance to the full update",
                 r"$\|\Delta W_r - \Delta W_{\rm full}\|_F \,/\, \|\Delta W_{\rm full}\|_F$"),
    "phi_full_{side}": ("top-r directions shared with full",
                        r"$\phi(\Delta W_r, \Delta W_{\rm full})$"),
    "energy_share": ("full update's energy in ΔW_r's span",
                     r"share of $\|\Delta W_{\rm full}\|_F^2$"),
    "phi_next_{side}": ("neighbouring ranks r, r′",
                        r"$\phi(\Delta W_r, \Delta W_{r'})$"),
}


def convergence(results, *, side: str = "right") -> pd.DataFrame:
    """Convergence as r grows: the metric, then each measure of CONVERGENCE, per module and all."""
    tables = _one(results)
    conv = _table(tables, "convergence", "the convergence figure")
    rows = [metric_rank({"LoRA": tables})]
    for col, (title, label) in CONVERGENCE.items():
        col = col.format(side=side)
        if col not in conv or conv[col].isna().all():
            continue
        d = _by_module(conv.dropna(subset=[col]), col)
        rows.append(d.assign(plot="convergence_curves", panel=title, quantity=label))
    return _panels(rows)


def relation(results, *, layer: int | None = None,
             modules: list[str] | None = None) -> pd.DataFrame:
    """Hu et al. Table 7: ‖UᵀWV‖_F for ΔW's, W's and random top-r directions, and amplification."""
    rel = _table(_one(results), "relation", "ΔW vs W")
    lora = rel[rel["method"] == "lora"]
    if lora.empty:
        raise InputError("ΔW vs W needs LoRA runs in the relation table")
    lay = _mid_layer(lora, layer)
    at = lora[lora["layer"] == lay]
    modules = list(modules or dict.fromkeys(at["module"]))
    names = {"delta_dirs": "ΔW's top-r", "w_dirs": "W's top-r",
             "random_expected": "random (expected)"}
    rows = []
    for m in modules:
        d = at[at["module"] == m].melt(id_vars=["rank", "seed", "module", "layer", "w_fro"],
                                       value_vars=list(names), var_name="directions")
        d["directions"] = d["directions"].map(names)
        rows.append(d.assign(plot="relation_bars", panel=f"W = {m}, layer {lay}",
                             quantity=r"$\|U^\top W V\|_F$"))
    amp = at[at["module"].isin(modules)].rename(columns={"module": "series",
                                                         "amplification": "value"})
    rows.append(amp[["method", "rank", "seed", "series", "value"]].assign(
        plot="convergence_curves", panel=f"amplification, layer {lay}",
        quantity=r"amplification $\|\Delta W\|_F \,/\, \|U^\top W V\|_F$"))
    return _panels(rows)


def intruders(results, *, eps: list[float] | None = None, eps_module: float = 0.5,
              modules: list[str] | None = None) -> pd.DataFrame:
    """Shuttleworth et al.: intruder dimensions per module vs r for several ε, and per module."""
    t = _table(_one(results), "intruders", "the intruder figure")
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
    return _panels([
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
    """Biderman et al.: the full update's energy rank k_τ by layer and module (attention vs MLP)."""
    mods = _table(_one(results), "modules", "the energy-rank figure")
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
    by_layer = full[["layer", "module", "group", "seed"]].assign(value=full[f"energy_rank_{tau}"])
    taus = [c for c in ("energy_rank_50", "energy_rank_90", "energy_rank_99") if c in full]
    bars = full.groupby(["group", "module"])[taus].median().reset_index().melt(
        id_vars=["group", "module"], value_vars=taus, var_name="tau")
    bars["tau"] = "$k_{" + bars["tau"].str.rsplit("_", n=1).str[1] + "}$"
    return _panels([
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


def truncation(results) -> pd.DataFrame:
    """The truncation test: gain share of W_0 + trunc_k(ΔW) vs k, beside ΔW_full's energy share."""
    tables = _one(results)
    curve = _table(tables, "truncation", "the truncation figure")
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
    return _panels([pd.concat(rows, ignore_index=True).assign(
        plot="truncation_curve", panel=r"truncation test: $W_0 + {\rm trunc}_k(\Delta W)$" + base)])


def rank_tokens(results) -> pd.DataFrame:
    """Biderman et al.: k₉₀ of the update against the training tokens behind it, full
    fine-tuning by module group (median over modules and seeds) and LoRA by rank, each full
    group's Gaussian k₉₀ floor beside it (``analysis.snapshots``)."""
    t = _table(_one(results), "snapshots", "rank vs tokens (a sweep trained with snapshots)")
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
    return _panels([pd.concat([lines, floor], ignore_index=True).assign(
        plot="rank_vs_tokens", panel=r"energy rank $k_{90}$ of $\Delta W$ as training goes on",
        quantity=r"$k_{90}$ (median module)")])


BUILDERS = {f.__name__: f for f in (subspace_ranks, subspace_seeds, metric_rank, convergence,
                                     relation, intruders, energy, truncation, rank_tokens,
                                     alpha_policies)}
