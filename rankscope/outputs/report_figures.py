"""The report's figures that ``plots`` has no function for, in its house style.

Each ``(df, *, ax=None) -> Axes``: training curves, singular-value spectra and the
recommended rank by layer. ``figure_png`` draws a panel function or a ``figure_data``
figure frame into PNG bytes.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd

from rankscope.outputs.plots import PANEL_H, PANEL_W, _axes, _colors, style

REPORT_DPI = 150          # enough for a screen; the paper figures use plots.DPI


def training_curves(df: pd.DataFrame, *, ax=None):
    """Training loss vs step, one line per run (full fine-tuning dashed black).

    Args:
        df: columns ``run``, ``method``, ``step``, ``loss``.
    """
    ax = _axes(ax)
    runs = list(dict.fromkeys(df["run"]))
    for run, color in zip(runs, _colors(len(runs))):
        g = df[df["run"] == run].sort_values("step")
        full = (g["method"] == "full").all()
        ax.plot(g["step"], g["loss"], lw=1.1, ls="--" if full else "-",
                color="black" if full else color, label=run, marker="." if len(g) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right", ncol=1 + len(runs) // 6)
    return ax


def spectrum_curves(df: pd.DataFrame, *, ax=None):
    """Normalised singular values σ_i/σ_1 of ΔW vs i on log-log axes, one line per series.

    Args:
        df: columns ``series`` (a module kind), ``index`` (1-based i), ``value`` (σ_i/σ_1).
    """
    ax = _axes(ax)
    series = list(dict.fromkeys(df["series"]))
    for s, color in zip(series, _colors(len(series))):
        g = df[df["series"] == s].sort_values("index")
        g = g[g["value"] > 0]
        ax.plot(g["index"], g["value"], lw=1.1, color=color, label=str(s))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("i (singular value number)")
    ax.set_ylabel("σᵢ / σ₁ (median over layers)")
    ax.legend(loc="lower left")
    return ax


def rank_by_layer(df: pd.DataFrame, *, ax=None):
    """The recommended rank r by layer, one line per module kind (log₂ axis).

    Args:
        df: columns ``layer``, ``module``, ``r``.
    """
    from matplotlib.ticker import MaxNLocator

    ax = _axes(ax)
    mods = list(dict.fromkeys(df["module"]))
    for m, color in zip(mods, _colors(len(mods))):
        g = df[df["module"] == m].sort_values("layer")
        ax.plot(g["layer"], g["r"].clip(lower=0.5), color=color, marker="o", ms=3, lw=1.1, label=m)
    ax.set_yscale("log", base=2)
    ticks = sorted({int(r) for r in df["r"] if r > 0})
    ax.set_yticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("recommended r")
    ax.legend(loc="best")
    return ax


def figure_png(draw, df: pd.DataFrame, *, panels: int = 1) -> bytes:
    """PNG bytes of ``draw(df, ax=…)`` (a plot function) on ``panels`` columns' width, or of
    ``plots.draw_figure(df)`` when ``draw`` is None."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with style():
        if draw is None:
            from rankscope.outputs.plots import draw_figure

            fig = draw_figure(df)
        else:
            fig, ax = plt.subplots(figsize=(PANEL_W * panels, PANEL_H * 1.1))
            draw(df, ax=ax)
            fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=REPORT_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def spectrum_frame(spectra: pd.DataFrame) -> pd.DataFrame:
    """σ_i/σ_1 per module kind, median over layers (and seeds): of the full updates, else of
    the largest LoRA rank's."""
    full = spectra[spectra["method"] == "full"]
    if full.empty:
        lora = spectra[spectra["method"] == "lora"]
        full = lora[lora["rank"] == lora["rank"].max()]
    s = full.assign(value=full["sigma"] / full.groupby(["run", "name"])["sigma"].transform("max"))
    out = s.groupby(["module", "index"])["value"].median().reset_index()
    out["index"] = out["index"] + 1
    return out.rename(columns={"module": "series"}).replace([np.inf, -np.inf], np.nan).dropna()
