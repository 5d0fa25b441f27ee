"""The words of a recommendation: its rationale and its validation, as short Markdown."""
from __future__ import annotations

from collections import Counter

import pandas as pd

from rankscope.recommend import evidence as core
def md_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub Markdown table (no index)."""
    def cell(v):
        return "" if v is None or (not isinstance(v, str) and pd.isna(v)) else \
            (f"{v:.4g}" if isinstance(v, float) else str(v)).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _counts(values) -> str:
    c = Counter(values)
    return ", ".join(f"{k} ×{n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))


def rationale(table: pd.DataFrame, config: dict, glob: dict, *, budget: int | None) -> str:
    """A short Markdown account of the recommendation: overall, per module kind, evidence."""
    on = table[table["r"] > 0]
    k, tr = glob["knee"], glob["truncation"]
    lines = ["## Recommended LoRA ranks", "",
             f"Overall **r = {config['r']}** (the most common rank), α = {config['lora_alpha']}, on "
             f"{', '.join(config['target_modules'])}: {len(on)} modules, "
             f"{int(on['params'].sum()):,} trainable LoRA parameters"
             + (f" of a budget of {budget:,}." if budget else "."),
             ("Confidence of the evidence's own ranks (r_evidence): " if budget else "Confidence: ")
             + f"{_counts(on['confidence'])}.", ""]
    per = on.groupby("module", sort=False).agg(
        layers=("layer", lambda s: f"{s.min()}–{s.max()}" if s.notna().any() else "–"),
        ranks=("r", _counts), confidence=("confidence", _counts)).reset_index()
    lines += [md_table(per), "", "Evidence:", ""]
    if k["rank"] is not None:
        lines.append(f"- Knee of the held-out {k['metric']} vs r: r = {k['rank']} (ranks tested: "
                     f"{', '.join(map(str, k['ranks']))})" + (", the largest tested: the metric "
                     "was still improving, so this is a lower bound." if k["at_edge"] else "."))
    else:
        lines.append("- Knee of the metric vs r: none (no LoRA runs, or no rank improved the metric).")
    if tr["rank"] is not None:
        lines.append(f"- Truncation test: W₀ + trunc_k(ΔW_full) keeps {core.TRUNC_SHARE:.0%} of full "
                     f"fine-tuning's gain at k = {tr['rank']}.")
    else:
        lines.append("- Truncation test: " + (
            "not used: full fine-tuning did not improve the metric." if tr.get("no_gain") else
            "not reached below full rank." if tr["reached"] is False else "not run (needs a full run)."))
    src = table["energy_source"].dropna().unique()
    lines += [f"- Per module: k{core.TAU} of the update ({', '.join(map(str, src))}), rounded up to a "
              "power of two; and the directions that neighbouring LoRA ranks share beyond chance (φ).",
              "- Rule: r = min(energy rank, max(knee, truncation)): no more rank than the metric "
              "needs, and no more than the module's update holds. High confidence: ≥ 3 pieces agree "
              "within ×2; medium: all but one; low: otherwise.", ""]
    if budget:
        lines += ["Under the budget, ranks were allocated greedily by the share of each module's "
                  "energy σ²_(k+1)/Σσ² per parameter (r·(d_out + d_in) each); the evidence's own "
                  "ranks are in recommendation.csv (r_evidence).", ""]
    low = on[on["confidence"] == "low"]
    if len(low):
        lines += ["Low-confidence modules (first 5):", ""]
        lines += [f"- {n}: {why}" for n, why in zip(low["name"][:5], low["reason"][:5])] + [""]
    lines += ["Use it:", "", "```python", "import json", "from peft import LoraConfig, get_peft_model",
              "config = LoraConfig(**json.load(open(\"lora_config.json\")))",
              "model = get_peft_model(model, config)", "```", ""]
    return "\n".join(lines)


def size_note(side: pd.DataFrame) -> str | None:
    """How the uniform rank's size compares with the recommendation's, in one sentence.

    One integer rank r on every module costs r·Σ(d_out + d_in) parameters, so a uniform config
    can match a per-module recommendation's count exactly only by chance: the validation
    trains the nearest, and this says so with both counts.

    Args:
        side: one row per config, with ``config`` (``recommended``, ``uniform``), ``ranks``
            (``r = 4``) and ``trainable_params``.
    Returns:
        The sentence, or None when either config is missing.
    """
    counts = dict(zip(side["config"], side["trainable_params"]))
    if not {"recommended", "uniform"} <= set(counts):
        return None
    rec, uni = int(counts["recommended"]), int(counts["uniform"])
    ranks = dict(zip(side["config"], side["ranks"]))["uniform"]
    if rec == uni:
        return (f"The uniform config ({ranks} on every module) has exactly the recommendation's "
                f"{rec:,} trainable parameters.")
    return (f"No uniform integer rank has exactly the recommendation's {rec:,} trainable "
            f"parameters: the nearest, {ranks} on every module, has {uni:,} "
            f"({uni - rec:+,}, {(uni - rec) / rec:+.1%}).")


def validation_side(val: pd.DataFrame, *, metric: str | None = None) -> pd.DataFrame:
    """``validate.csv`` side by side: one row per config, metrics averaged over seeds.

    Args:
        metric: with it, ``before``, ``after`` and ``after_std`` of that metric; without,
            the mean of every ``after_<metric>`` column.
    """
    aggs = {"trainable_params": ("trainable_params", "first"), "seeds": ("seed", "count")}
    if metric is None:
        aggs |= {c: (c, "mean") for c in val.columns if c.startswith("after_")}
    else:
        aggs |= {"before": (f"before_{metric}", "mean"), "after": (f"after_{metric}", "mean"),
                 "after_std": (f"after_{metric}", "std")}
    return val.groupby(["config", "ranks"], sort=False).agg(**aggs).reset_index()


def validation_text(val: pd.DataFrame) -> str:
    """The validation, side by side, as Markdown, with how the two configs' sizes compare."""
    side = validation_side(val)
    note = size_note(side)
    return "\n".join(["## Validation", "", "Retrained with the same data, seeds and steps as the "
                      "sweep (means over seeds):", "", md_table(side), "",
                      *([note, ""] if note else [])])
