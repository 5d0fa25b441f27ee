"""Plot functions: one per figure kind, each ``(df, *, ax=None) -> Axes``, in one house style.

Every function draws a tidy DataFrame (the columns its docstring names; others are ignored)
onto ``ax`` (a new figure when None) and returns the Axes. matplotlib and seaborn are imported
inside; nothing here shows or saves a figure. Draw inside ``with style():`` for the house
look (``draw_figure`` does: one figure of several panels, each drawn by its function).
"""
from __future__ import annotations

import contextlib
import textwrap

import numpy as np
import pandas as pd

from rankscope.errors import InputError

PANEL_W, PANEL_H = 3.5, 2.7          # inches: one panel fills a paper column
DPI = 200
PALETTE = "colorblind"               # every categorical hue
CMAP = "rocket"                      # every heatmap: dark = 0, light = 1
SHARES = (0.9, 0.95)                 # the truncation test's reference shares of the gain
OVERALL = "all modules"              # the series of medians over every module: drawn black
# The energy-rank panels' noise floors: rows whose ``group`` is one of these, ``module`` the module
# whose floor it is; drawn per module in the line style, one legend entry (the text) per kind.
FLOORS = {"floor: Gaussian matrix": (":", "Gaussian floor"),
          "floor: ΔW seed a − seed b": ("-.", "seed-to-seed floor")}


@contextlib.contextmanager
def style():
    """The house style: seaborn "paper" context, "ticks" axes, one palette, 200 dpi."""
    import matplotlib as mpl
    import seaborn as sns
    from cycler import cycler

    rc = {**sns.axes_style("ticks"), **sns.plotting_context("paper", font_scale=0.95),
          "axes.prop_cycle": cycler(color=sns.color_palette(PALETTE)), "image.cmap": CMAP,
          "figure.dpi": DPI, "savefig.dpi": DPI, "savefig.bbox": "tight",
          "legend.frameon": True, "legend.framealpha": 0.85, "legend.edgecolor": "none",
          "legend.fontsize": 6.5, "legend.title_fontsize": 7,     # lines pass under, legibly
          "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 8}
    with mpl.rc_context(rc):
        yield


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(PANEL_W, PANEL_H))
    return ax


def _colors(n: int):
    import seaborn as sns

    return sns.color_palette(PALETTE, max(n, 1))


def _log2_x(ax, values, label: str) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted({int(v) for v in values if pd.notna(v)})
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(t) for t in ticks])
    ax.set_xlabel(label)


def _label(df: pd.DataFrame, col: str = "quantity", default: str = "") -> str:
    return str(df[col].dropna().iloc[0]) if col in df and df[col].notna().any() else default


def subspace_heatmap(df: pd.DataFrame, *, ax=None):
    """φ(i, j) as a heatmap (Hu et al. Figures 3 and 4), i down the rows, j along the columns.

    Args:
        df: columns ``i``, ``j`` (1-based numbers of top directions) and ``phi`` ∈ [0, 1].
    Returns:
        The Axes, with a colour bar of φ on a fixed 0–1 scale.
    """
    ax = _axes(ax)
    grid = df.pivot_table(index="i", columns="j", values="phi", aggfunc="mean").sort_index()
    grid = grid.reindex(sorted(grid.columns), axis=1)
    ni, nj = grid.shape
    im = ax.imshow(grid.to_numpy(), cmap=CMAP, vmin=0.0, vmax=1.0, aspect="auto",
                   interpolation="nearest", extent=(0.5, nj + 0.5, ni + 0.5, 0.5))
    for axis, n in ((ax.xaxis, nj), (ax.yaxis, ni)):
        step = max(1, int(np.ceil(n / 8)))
        axis.set_ticks([1] + list(range(step, n + 1, step))[int(step == 1):])
    ax.set_xlabel("j")
    ax.set_ylabel("i", rotation=0, labelpad=6)
    ax.figure.colorbar(im, ax=ax, label="φ", fraction=0.05, pad=0.03)
    return ax


def _rank_lines(df: pd.DataFrame, ax, *, xlabel: str = "LoRA rank r"):
    """LoRA rows as the median over seeds vs r per ``series``, the bars spanning the seeds' range
    (minimum to maximum); full and base rows as lines, full with its seeds' range as a band."""
    from matplotlib.lines import Line2D

    lora = df[df["method"] == "lora"]
    series = list(dict.fromkeys(lora["series"]))
    colors = dict(zip(series, _colors(len(series))))
    if OVERALL in colors:
        colors[OVERALL] = "black"
    for n, s in enumerate(series):
        g = lora[lora["series"] == s].groupby("rank")["value"].agg(
            ["median", "min", "max"]).reset_index()
        dodge = 2 ** (0.04 * (n - (len(series) - 1) / 2))      # equal values stay visible
        spread = [g["median"] - g["min"], g["max"] - g["median"]]
        ax.errorbar(g["rank"] * dodge, g["median"], yerr=spread, color=colors[s],
                    marker="o", ms=3, lw=1.2, capsize=2, label=str(s))
    in_own_colour = False
    for (method, s), g in df[df["method"].isin(["full", "base"])].groupby(
            ["method", "series"], sort=False):
        own = colors.get(s)
        in_own_colour |= own is not None and method == "full"
        color = own if own is not None else ("black" if method == "full" else "0.55")
        ax.axhline(g["value"].median(), color=color, lw=1.0,
                   ls="--" if method == "full" else ":",
                   label=None if own is not None else str(s))
        if method == "full" and own is None and g["value"].max() > g["value"].min():
            ax.axhspan(g["value"].min(), g["value"].max(), color=color, alpha=0.08, lw=0)
    _log2_x(ax, lora["rank"], xlabel)
    ax.set_ylabel(_label(df))
    handles, labels = ax.get_legend_handles_labels()
    if in_own_colour:               # full fine-tuning drawn per series: one entry says so
        handles.append(Line2D([], [], color="0.3", lw=1.0, ls="--"))
        labels.append("full fine-tuning (dashed)")
    order = sorted(range(len(labels)), key=lambda i: labels[i] not in colors)   # LoRA first
    ax.legend([handles[i] for i in order], [labels[i] for i in order], loc="best")
    return ax


def _headroom_legend(ax, ncol: int) -> None:
    """A legend in a band above the data of a log-scale axis, so that no bar hides under it."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * (hi / lo) ** 0.35)
    ax.legend(title=None, loc="upper left", ncol=ncol, columnspacing=0.8, handlelength=1.2)


def _plain_log_y(ax, subs=(1.0,)) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def metric_vs_rank(df: pd.DataFrame, *, ax=None):
    """The task metric vs LoRA rank (Hu et al. Tables 6 and 18): the median over seeds, their
    range (minimum to maximum) as error bars.

    Args:
        df: columns ``series`` (e.g. the targets), ``method`` (``lora`` points; ``full``: a
            dashed line at the seeds' median in a band over their range; ``base``: the model
            before training, dotted),
            ``rank``, ``seed``, ``value`` and ``quantity`` (the y label).
    Returns:
        The Axes, r on a log₂ axis.
    """
    return _rank_lines(df, _axes(ax))


def convergence_curves(df: pd.DataFrame, *, ax=None):
    """A measure of ΔW_r against ΔW_full (or ΔW_r′) vs r, one line per module and overall.

    Args:
        df: columns ``series`` (module, or "all modules"), ``method`` (``lora``), ``rank``,
            ``seed``, ``value`` (a median over layers) and ``quantity`` (the y label);
            optionally ``null_q99``, the null's 99% quantile of each row: a dotted grey line
            at its median per rank (over the "all modules" rows when there are some).
    """
    ax = _axes(ax)
    if "null_q99" in df and df["null_q99"].notna().any():
        rows = df[df["series"] == OVERALL] if (df["series"] == OVERALL).any() else df
        q = rows.dropna(subset=["rank", "null_q99"]).groupby("rank")["null_q99"].median()
        ax.plot(q.index, q.to_numpy(), color="0.5", ls=":", lw=1.0, label="random: 99% quantile")
    ax = _rank_lines(df, ax)
    if df["value"].between(0, 1).all() and any(w in _label(df) for w in ("phi", "share")):
        ax.set_ylim(-0.02, 1.02)         # φ and energy shares live in [0, 1]
    return ax


def intruder_counts(df: pd.DataFrame, *, ax=None):
    """Intruder dimensions among the top-k vectors of W_0 + ΔW vs r; full fine-tuning dashed.

    Args:
        df: columns ``series`` (an ε, or a module), ``method`` (``lora`` or ``full``: a
            dashed line in the colour of its series), ``rank``, ``seed``, ``value`` (mean count
            per module) and ``quantity`` (the y label).
    """
    ax = _rank_lines(df, _axes(ax))
    ax.set_ylim(-0.3, max(1.0, 1.45 * float(df["value"].max())))   # counts: 0 at the bottom,
                                                                    # room above for the legend
    return ax


def relation_bars(df: pd.DataFrame, *, ax=None):
    """Hu et al. Table 7 as bars: ‖UᵀWV‖_F for ΔW's, W's own and random top-r directions.

    Args:
        df: columns ``rank`` (r), ``directions`` (whose top-r singular vectors U, V are),
            ``value`` (‖UᵀWV‖_F), optionally ``seed`` (bars: the median over seeds, their
            range as error bars) and ``quantity``.
    Returns:
        The Axes, on a log y scale.
    """
    import seaborn as sns

    ax = _axes(ax)
    d = df.assign(rank=df["rank"].astype(int))
    hue_order = list(dict.fromkeys(d["directions"]))
    sns.barplot(d, x="rank", y="value", hue="directions", hue_order=hue_order, estimator="median",
                errorbar=("pi", 100),
                palette=_colors(len(hue_order)), ax=ax, err_kws={"linewidth": 0.8}, capsize=0.1)
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("r (top-r directions)")
    ax.set_ylabel(_label(df, default="‖UᵀWV‖_F"))
    _headroom_legend(ax, ncol=len(hue_order))
    return ax


def energy_rank(df: pd.DataFrame, *, ax=None):
    """The energy rank k_τ of the full update by layer: one line per module, MLP dashed.

    Args:
        df: columns ``layer``, ``module``, ``group`` (``attention``, ``MLP``, ``head``;
            ``reference``: a grey horizontal line named by ``module``; a key of ``FLOORS``: the
            noise floor of ``module``, a thin line in its colour), ``value`` (k_τ, the median
            over seeds is drawn) and ``quantity``.
    """
    ax = _axes(ax)
    data = df[~df["group"].isin(["reference", *FLOORS])]
    modules = list(dict.fromkeys(data.sort_values("group", kind="stable")["module"]))
    colors = dict(zip(modules, _colors(len(modules))))
    for m in modules:
        g = data[data["module"] == m]
        line = g.groupby("layer")["value"].median()
        ls = "--" if (g["group"] == "MLP").any() else "-"
        ax.plot(line.index, line.to_numpy(), ls=ls, color=colors[m], marker=".", ms=3, lw=1.1,
                label=m)
    for _, r in df[df["group"] == "reference"].iterrows():
        ax.axhline(r["value"], color="0.4", ls=(0, (1, 3)), lw=1.2, label=r["module"])
    floors = df[df["group"].isin(FLOORS) & df["module"].isin(modules)]
    for _, r in floors.iterrows():
        ax.axhline(r["value"], color=colors[r["module"]], ls=FLOORS[r["group"]][0], lw=0.7,
                   alpha=0.8)
    from matplotlib.ticker import MaxNLocator

    ax.set_yscale("log")
    _plain_log_y(ax, subs=(1.0, 2.0, 5.0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(_label(df, default="energy rank"))
    handles, labels = ax.get_legend_handles_labels()
    extra = _floor_entries(floors, "0.3")
    ax.legend(handles + [h for h, _ in extra], labels + [t for _, t in extra],
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def _floor_entries(floors: pd.DataFrame, color) -> list:
    """One legend entry (handle, text) per kind of noise floor among ``floors``."""
    from matplotlib.lines import Line2D

    return [(Line2D([], [], color=color, lw=0.9, ls=ls), text)
            for kind, (ls, text) in FLOORS.items() if (floors["group"] == kind).any()]


def energy_rank_bars(df: pd.DataFrame, *, ax=None):
    """Energy ranks k_50, k_90, k_99 of the full update per module, as bars (log scale).

    Args:
        df: columns ``module``, ``group`` (``reference`` rows: grey horizontal lines named by
            ``module``; rows of a ``FLOORS`` kind: ``module``'s noise floor, a short line over
            its bars), ``tau`` (the label of τ), ``value`` (k_τ, median over layers and seeds)
            and ``quantity``.
    """
    import seaborn as sns

    ax = _axes(ax)
    data = df[~df["group"].isin(["reference", *FLOORS])]
    taus = list(dict.fromkeys(data["tau"]))
    sns.barplot(data, x="module", y="value", hue="tau", hue_order=taus, errorbar=None,
                palette=_colors(len(taus)), ax=ax)
    for _, r in df[df["group"] == "reference"].iterrows():
        ax.axhline(r["value"], color="0.4", ls=(0, (1, 3)), lw=1.2, label=r["module"])
    at = {m: x for x, m in enumerate(dict.fromkeys(data["module"]))}   # seaborn's x positions
    floors = df[df["group"].isin(FLOORS) & df["module"].isin(at)]
    for _, r in floors.iterrows():
        x = at[r["module"]]
        ax.plot([x - 0.45, x + 0.45], [r["value"]] * 2, color="black",
                ls=FLOORS[r["group"]][0], lw=1.0)
    for handle, text in _floor_entries(floors, "black"):
        handle.set_label(text)
        ax.add_line(handle)             # no data: only its legend entry
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_xlabel("")
    ax.tick_params(axis="x", labelrotation=35)
    for t in ax.get_xticklabels():
        t.set_horizontalalignment("right")
    ax.set_ylabel(_label(df, default="energy rank"))
    _headroom_legend(ax, ncol=3)
    return ax


def truncation_curve(df: pd.DataFrame, *, ax=None):
    """Share of full fine-tuning's gain kept by W_0 + trunc_k(ΔW) vs k, beside ΔW's energy.

    Args:
        df: columns ``curve`` (one line each: a run's gain share, or the energy share
            Σ_{i≤k} σ_i² / Σ σ_i²), ``k`` and ``value``; dotted lines mark 90% and 95%.
    """
    ax = _axes(ax)
    curves = list(dict.fromkeys(df["curve"]))
    for c, color in zip(curves, _colors(len(curves))):
        g = df[df["curve"] == c].groupby("k")["value"].mean()
        energy = str(c).startswith("energy")
        ax.plot(g.index, g.to_numpy(), color=color, lw=1.2, ls="--" if energy else "-",
                marker=None if energy else "o", ms=3, label=str(c))
    for n, s in enumerate(SHARES):
        ax.axhline(s, color="0.5", ls=":", lw=0.9,
                   label=" and ".join(f"{x:.0%}" for x in SHARES) if n == 0 else None)
    kmax = int(df["k"].max())
    ticks = [2 ** p for p in range(int(np.log2(kmax)) + 1)]
    ticks = ticks[::1 if len(ticks) <= 7 else 2]
    ticks = ticks + [kmax] if kmax / ticks[-1] >= 1.6 else ticks[:-1] + [kmax]   # full rank
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("k (rank of the truncated update)")
    ax.set_ylabel("share of the full-rank value")
    ax.legend(loc="lower right")
    return ax


def rank_vs_tokens(df: pd.DataFrame, *, ax=None):
    """An update's energy rank against the training tokens behind it (Biderman et al.), log-log.

    Args:
        df: columns ``series`` (one line each), ``method`` (``floor`` rows: a dotted
            horizontal line per series, the Gaussian k₉₀ of the modules' shape), ``tokens``
            and ``value`` (k₉₀); LoRA series dashed.
    """
    ax = _axes(ax)
    data = df[df["method"] != "floor"]
    series = list(dict.fromkeys(data["series"]))
    for name, color in zip(series, _colors(len(series))):
        g = data[data["series"] == name].groupby("tokens")["value"].median()
        lora = (data[data["series"] == name]["method"] == "lora").any()
        ax.plot(g.index, g.to_numpy(), color=color, marker="o", ms=3, lw=1.2,
                ls="--" if lora else "-", label=name)
    for _, r in df[df["method"] == "floor"].iterrows():
        ax.axhline(r["value"], color="0.4", ls=":", lw=1.0, label=r["series"])
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log")
    ticks = sorted({float(t) for t in data["tokens"].dropna()})    # the snapshots and the end
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t / 1000:.0f}k" if t >= 1000 else f"{t:.0f}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yscale("log")
    _plain_log_y(ax, subs=(1.0, 2.0, 5.0))
    ax.set_xlabel("training tokens (steps × batch × length)")
    ax.set_ylabel(_label(df, default="energy rank"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


PLOTS = {f.__name__: f for f in (subspace_heatmap, metric_vs_rank, convergence_curves,
                                  intruder_counts, relation_bars, energy_rank, energy_rank_bars,
                                  truncation_curve, rank_vs_tokens)}
_RANK_LINES = ("series", "method", "rank", "value")
# The data columns each plot function reads (others, such as seed or quantity, are optional).
COLUMNS = {"subspace_heatmap": ("i", "j", "phi"), "metric_vs_rank": _RANK_LINES,
           "convergence_curves": _RANK_LINES, "intruder_counts": _RANK_LINES,
           "relation_bars": ("rank", "directions", "value"),
           "energy_rank": ("layer", "module", "group", "value"),
           "energy_rank_bars": ("module", "group", "tau", "value"),
           "truncation_curve": ("curve", "k", "value"),
           "rank_vs_tokens": ("series", "method", "tokens", "value")}


def draw_figure(df: pd.DataFrame, *, caption: str | None = None):
    """A matplotlib Figure with one panel per ``panel`` of ``df``, drawn by ``plots.PLOTS``.

    Raises:
        InputError: no ``plot``/``panel`` column, an unknown plot function, or a panel that
            lacks a data column its plot function reads.
    """
    import matplotlib.pyplot as plt

    if not {"plot", "panel"} <= set(df.columns) or df.empty:
        raise InputError("figure data needs rows and the columns 'plot' and 'panel'")
    if df[["plot", "panel"]].isna().any().any():
        raise InputError("figure data has rows without a plot or a panel name")
    unknown = sorted(set(df["plot"]) - set(PLOTS))
    if unknown:
        raise InputError(f"unknown plot {unknown[0]!r}; known: {', '.join(PLOTS)}")
    check_columns(df)
    panels = list(dict.fromkeys(df["panel"]))
    n = len(panels)
    ncols = n if n <= 3 else (2 if n == 4 else 3)
    nrows = -(-n // ncols)
    with style():
        fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_W * ncols, PANEL_H * nrows),
                                 squeeze=False)
        for ax, p in zip(axes.flat, panels):
            rows = df[df["panel"] == p].dropna(axis=1, how="all")
            PLOTS[rows["plot"].iloc[0]](rows, ax=ax)
            ax.set_title(p)
        for ax in axes.flat[n:]:
            ax.set_visible(False)
        fig.tight_layout()
        if caption:
            width = int(PANEL_W * ncols * 17)          # characters per line at 6.5 pt
            fig.text(0.01, 0.0, textwrap.fill(caption, width), ha="left", va="top", fontsize=6.5)
    return fig


def check_columns(df: pd.DataFrame) -> None:
    """Every panel has the data columns its plot function reads (with a value in some row).

    Raises:
        InputError: naming the panel, its plot function and the missing columns.
    """
    for (panel, plot), rows in df.groupby(["panel", "plot"], sort=False, dropna=False):
        have = set(rows.dropna(axis=1, how="all").columns)
        missing = [c for c in COLUMNS[plot] if c not in have]
        if missing:
            raise InputError(f"figure data for panel {panel!r} ({plot}) lacks the column"
                             f"{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                             f"(it needs {', '.join(COLUMNS[plot])})")
