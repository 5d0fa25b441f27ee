"""A short statement on the low-intrinsic-rank hypothesis, built only from a sweep's numbers."""
from __future__ import annotations

import math

import pandas as pd


def metric_name(metrics: pd.DataFrame) -> tuple[str, bool]:
    """The task metric and whether higher is better: accuracy for classification, else loss."""
    if "after_accuracy" in metrics:
        return "accuracy", True
    return "loss", False


def metric_vs_rank(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per method and rank: mean, std and count over seeds of the held-out metric after training."""
    key, _ = metric_name(metrics)
    df = metrics.assign(rank=metrics["rank"].astype("Int64"))
    g = df.groupby(["method", "rank"], dropna=False)[f"after_{key}"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["before"] = float(df[f"before_{key}"].mean())
    out["metric"] = key
    return out


def matching_rank(metrics: pd.DataFrame, *, share: float = 0.95) -> dict:
    """The smallest LoRA rank whose metric matches full fine-tuning.

    "Matches": within the seeds' spread (2 pooled standard deviations), or within
    ``1 − share`` of full fine-tuning's gain over the base model, whichever is larger.
    """
    key, higher = metric_name(metrics)
    t = metric_vs_rank(metrics)
    full = t[t["method"] == "full"]
    lora = t[t["method"] == "lora"].sort_values("rank")
    if full.empty or lora.empty:
        return {"metric": key, "rank": None, "tolerance": None}
    f_mean, f_std, before = float(full["mean"].iloc[0]), float(full["std"].iloc[0]), float(full["before"].iloc[0])
    gain = (f_mean - before) if higher else (before - f_mean)
    if gain <= 0:
        return {"metric": key, "rank": None, "tolerance": None, "full": f_mean, "gain": gain,
                "no_gain": True}
    for _, row in lora.iterrows():
        tol = max(2 * math.hypot(f_std, row["std"]) / math.sqrt(2), (1 - share) * abs(gain))
        gap = (f_mean - row["mean"]) if higher else (row["mean"] - f_mean)
        if gap <= tol:
            return {"metric": key, "rank": int(row["rank"]), "tolerance": tol, "full": f_mean,
                    "lora": float(row["mean"]), "gain": gain}
    return {"metric": key, "rank": None, "tolerance": None, "full": f_mean, "gain": gain}


def _median(df: pd.DataFrame, col: str, **where) -> float | None:
    for k, v in where.items():
        df = df[df[k] == v]
    return None if df.empty or col not in df else float(df[col].median())


def verdict(frames: dict[str, pd.DataFrame]) -> tuple[str, dict]:
    """The hypothesis verdict as Markdown text, and the numbers it rests on.

    Evidence used (each when its table is present): the smallest rank matching full
    fine-tuning; the functional (truncation) vs energy rank of the full update; φ of the top
    direction between ranks against its random null; amplification at small vs large r.
    """
    ev: dict = {"match": matching_rank(frames["metrics"])}
    mods = frames.get("modules")
    full_mods = mods[mods["method"] == "full"] if mods is not None else pd.DataFrame()
    ev["full_energy_rank_90"] = _median(full_mods, "energy_rank_90")
    ev["full_min_dim"] = int(full_mods[["d_out", "d_in"]].min(axis=1).median()) if len(full_mods) else None
    sub = frames.get("subspace")
    if sub is not None and len(sub):
        top = sub[(sub["pair"] == "ranks") & (sub["i"] == 1)]
        ev["phi_top_ranks"] = _median(top, "phi")
        ev["phi_top_null"] = _median(top, "null_mean")
    rel = frames.get("relation")
    if rel is not None and len(rel):
        lora = rel[rel["method"] == "lora"]
        if len(lora):
            ranks = sorted(lora["rank"].dropna().unique())
            ev["amp_small"] = (int(ranks[0]), _median(lora, "amplification", rank=ranks[0]))
            ev["amp_large"] = (int(ranks[-1]), _median(lora, "amplification", rank=ranks[-1]))
    trunc = frames.get("truncation_summary")
    if trunc is not None and len(trunc[trunc["method"] == "full"]):
        full = trunc[trunc["method"] == "full"]
        ev["functional_rank"] = {}
        for share, g in full.groupby("share"):
            # a share no seed reached counts as unreached; else the median over seeds
            ks = g["k"]
            ev["functional_rank"][f"{round(share * 100)}%"] = \
                None if ks.isna().any() else int(ks.median())
    return _text(ev), ev


def _text(ev: dict) -> str:
    m = ev["match"]
    lines = ["## Verdict", ""]
    holds = {}      # test → whether it supports the hypothesis
    if m.get("rank") is not None:
        lines.append(f"- LoRA at r = {m['rank']} matches full fine-tuning: {m['metric']} "
                     f"{m['lora']:.4g} vs {m['full']:.4g} (tolerance {m['tolerance']:.3g}, full gain "
                     f"{m['gain']:.3g} over the base model).")
        holds["match"] = m["rank"] <= 16
    elif m.get("no_gain"):
        lines.append(f"- Full fine-tuning did not improve on the base model ({m['metric']} "
                     f"{m['full']:.4g}, gain {m['gain']:.3g}): there is no gain whose rank to measure.")
        lines += ["", "**No verdict:** train longer or with another learning rate until full "
                  "fine-tuning beats the base model.", ""]
        return "\n".join(lines) + "\n"
    elif m.get("full") is not None:
        lines.append(f"- No LoRA rank matched full fine-tuning's {m['metric']} {m['full']:.4g}.")
        holds["match"] = False
    er, dmin = ev.get("full_energy_rank_90"), ev.get("full_min_dim")
    if er is not None:
        lines.append(f"- 90% of the full update's energy needs a median rank k₉₀ = {er:.0f} per "
                     f"module, of at most {dmin} ({100 * er / dmin:.0f}%).")
    fr = ev.get("functional_rank")
    if fr:
        shown = ", ".join(f"{k} of the gain at k = {v}" if v is not None else f"{k} not reached"
                          for k, v in fr.items())
        lines.append(f"- Truncating the full update keeps {shown}: its functional rank.")
        k90 = fr.get("90%")
        if k90 is not None and dmin:
            holds["truncation"] = k90 <= max(16, dmin // 8)
    if ev.get("phi_top_ranks") is not None:
        lines.append(f"- The top direction of different ranks overlaps with median φ = "
                     f"{ev['phi_top_ranks']:.2f} against a random null of {ev['phi_top_null']:.3f}.")
    if ev.get("amp_small") and ev["amp_small"][1] is not None:
        (rs, a_s), (rl, a_l) = ev["amp_small"], ev["amp_large"]
        lines.append(f"- Amplification ‖ΔW‖/‖UᵀWV‖ is {a_s:.3g} at r = {rs} and {a_l:.3g} at r = {rl}.")
    lines.append("")
    lines.append(_conclusion(holds, ev))
    lines.append("It would have been refuted if no r ≤ 16 came within the tolerance of full "
                 "fine-tuning, or if truncating the full update to 90% of its gain needed a rank "
                 "near min(d_out, d_in).")
    return "\n".join(lines) + "\n"


def _conclusion(holds: dict[str, bool], ev: dict) -> str:
    """The bold conclusion from the tests that were run: "match" (a LoRA rank ≤ 16 matches full
    fine-tuning) and "truncation" (90% of the full update's gain survives truncation to a low
    rank); each mixed case says which test failed."""
    if not holds:
        return "**Not enough evidence:** the sweep needs a full run and LoRA runs to decide."
    if all(holds.values()):
        return "**The hypothesis holds here:** a low rank reaches full fine-tuning's quality."
    if not any(holds.values()):
        return "**The hypothesis does not hold here:** the update needs a high rank."
    if holds.get("match"):
        k90 = ev["functional_rank"]["90%"]
        return (f"**Mixed evidence:** LoRA at r = {ev['match']['rank']} reached full fine-tuning "
                f"within the tolerance, but the full update keeps 90% of its gain only from "
                f"k = {k90} directions: full fine-tuning spread its gain over more directions "
                "than LoRA needed.")
    return ("**Mixed evidence:** part of the gain lives in a low-rank subspace (truncating the "
            "full update to a low rank keeps 90% of it), but no LoRA run of r ≤ 16 reached full "
            "fine-tuning within the tolerance.")
