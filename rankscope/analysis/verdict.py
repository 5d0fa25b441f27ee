"""The verdict on the low-intrinsic-rank hypothesis: holds, refuted or inconclusive.

Built only from a sweep's tables, by tests declared here before any number is seen
(docs/science.md, "A verdict that can fail"). Each test has a value, a threshold and the gate
it needs; a failed gate makes its test inconclusive, never a pass:

* **gates** — full fine-tuning gained over the base model and plateaued (the last fifth of its
  learning-rate schedule made at most ``PLATEAU_MAX`` of its gain); the LoRA runs a test reads
  gained.
* **equivalence** — the smallest LoRA rank whose metric lies within a margin of full
  fine-tuning's *in both directions*; the margin is the larger of ``MARGIN_MIN`` of the full
  gain and 2 pooled standard deviations of the seeds, so it needs ≥ 2 seeds of each. A rank
  that *beats* full fine-tuning beyond the margin counts (as "at least as good") only when
  full fine-tuning's rate was chosen on a validation split (``--lr-search``); at a rate set
  by hand it makes the test inconclusive, since the full run may simply have been trained
  badly. The known-answer control showed why both halves are needed: on a planted rank 4,
  full fine-tuning of the same weights at its best searched rate stops at 40× the loss of
  LoRA r = 4 (tests/pipeline/test_planted_controls.py).
* **functional rank** — k₉₀ of the truncation test measured from the k = 0 baseline (linear
  weights at W₀, the rest fine-tuned), against min(d_out, d_in) and against the k₉₀ of a
  Gaussian matrix of the same shape (the noise floor).
* **shared direction** — median φ of the top direction between LoRA ranks (column space) above
  its null's 99% quantile.

*Holds*: no gate fails, equivalence passes at r ≤ ``LOW_RANK``, the functional rank is low, and
every other test that ran passes. *Refuted*: no gate fails, no tested rank matches and the
functional rank is high. Anything else is *inconclusive*, with the failed gate or test named
and what to run next.
"""
from __future__ import annotations

import math

import pandas as pd

PLATEAU_MAX = 0.15      # share of full fine-tuning's gain allowed in the last fifth of its
                        # learning-rate schedule (rankscope.train.evidence.late_step)
MARGIN_MIN = 0.05       # smallest equivalence margin, as a share of full fine-tuning's gain
LOW_RANK = 16           # the largest r that counts as "a small r" for equivalence
LOW_SHARE = 1 / 8       # functional k₉₀ at most this share of min(d_out, d_in) is "low" …
HIGH_SHARE = 1 / 4      # … and at least this share (or not reached) is "high"
COLUMNS = ["test", "status", "value", "threshold", "gate", "note"]
GATES = ("full gained", "full plateaued", "LoRA gained")
NOT_BEST_LEARNER = "full fine-tuning is not the best learner"   # LoRA beat it at a hand-set rate


def metric_name(metrics: pd.DataFrame) -> tuple[str, bool]:
    """The task metric and whether higher is better: accuracy for classification, else loss."""
    if "after_accuracy" in metrics:
        return "accuracy", True
    return "loss", False


def metric_by_rank(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per method and rank: mean, std and count over seeds of the held-out metric after training."""
    key, _ = metric_name(metrics)
    df = metrics.assign(rank=metrics["rank"].astype("Int64"))
    g = df.groupby(["method", "rank"], dropna=False)[f"after_{key}"]
    out = g.agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    out["before"] = float(df[f"before_{key}"].mean())
    out["metric"] = key
    return out


def _row(test, status, value=None, threshold=None, gate="", note="") -> dict:
    return dict(zip(COLUMNS, (test, status, value, threshold, gate, note)))


def gates(metrics: pd.DataFrame) -> list[dict]:
    """Full fine-tuning gained and plateaued; the LoRA runs gained. One row per gate."""
    key, higher = metric_name(metrics)
    sign = 1 if higher else -1
    gain = sign * (metrics[f"after_{key}"] - metrics[f"before_{key}"])
    full, lora = metrics["method"] == "full", metrics["method"] == "lora"
    rows = []
    if full.any():
        g = float(gain[full].median())
        rows.append(_row("full gained", "pass" if g > 0 else "fail", g, 0.0,
                         note=f"median held-out {key} gain of full fine-tuning over the base model"))
        late = metrics.loc[full, "late_gain_share"] if "late_gain_share" in metrics else None
        if late is None or late.isna().all():
            rows.append(_row("full plateaued", "inconclusive", None, PLATEAU_MAX,
                             note="the runs record no held-out metric at 80% of the "
                                  "learning-rate schedule"))
        else:
            worst = float(late.max())
            rows.append(_row("full plateaued", "pass" if worst <= PLATEAU_MAX else "fail", worst,
                             PLATEAU_MAX, note=f"full fine-tuning's last fifth (of its learning-"
                                               f"rate schedule) made {worst:.0%} of its gain"))
    if lora.any():
        bad = metrics.loc[lora & (gain <= 0), "run"].tolist()
        rows.append(_row("LoRA gained", "fail" if bad else "pass", len(bad), 0,
                         note=("runs with no gain: " + ", ".join(bad)) if bad else
                         "every LoRA run improved on the base model"))
    return rows


def equivalence(metrics: pd.DataFrame) -> dict:
    """The smallest LoRA rank within a two-sided margin of full fine-tuning, as a verdict row."""
    key, higher = metric_name(metrics)
    t = metric_by_rank(metrics)
    full, lora = t[t["method"] == "full"], t[t["method"] == "lora"].sort_values("rank")
    gate = "full gained, full plateaued"
    if full.empty or lora.empty:
        return _row("equivalence", "skipped", gate=gate, note="needs full and LoRA runs")
    f = full.iloc[0]
    gain = (f["mean"] - f["before"]) * (1 if higher else -1)
    if int(f["count"]) < 2 or int(lora["count"].min()) < 2:
        return _row("equivalence", "inconclusive", gate=gate,
                    note="one seed gives no spread to set the margin: run ≥ 2 seeds")
    for _, r in lora.iterrows():
        margin = max(MARGIN_MIN * abs(gain), 2 * math.hypot(f["std"], r["std"]) / math.sqrt(2))
        gap = r["mean"] - f["mean"]
        if abs(gap) <= margin:
            return _row("equivalence", "pass" if r["rank"] <= LOW_RANK else "fail", int(r["rank"]),
                        LOW_RANK, gate, f"LoRA r = {int(r['rank'])} {key} {r['mean']:.4g} vs full "
                        f"{f['mean']:.4g}: |gap| {abs(gap):.3g} ≤ margin {margin:.3g}")
    best = lora.iloc[(lora["mean"] - f["mean"]).abs().argmin()]
    better = lora[(lora["mean"] - f["mean"]) * (1 if higher else -1) > 0]
    if len(better):
        b = better.iloc[0]
        beats = (f"LoRA r = {int(b['rank'])} beats full fine-tuning beyond the margin ({key} "
                 f"{b['mean']:.4g} vs {f['mean']:.4g})")
        if _rate_searched(metrics):            # better than a full fine-tune at its best rate
            return _row("equivalence", "pass" if b["rank"] <= LOW_RANK else "fail",
                        int(b["rank"]), LOW_RANK, gate, f"{beats}, whose learning rate was "
                        "chosen on a validation split: at least as good")
        return _row("equivalence", "inconclusive", None, LOW_RANK, gate,
                    f"{beats}: {NOT_BEST_LEARNER} at its rate and scope, so no rank can be said "
                    "to match it")
    return _row("equivalence", "fail", None, LOW_RANK, gate,
                f"no LoRA rank within the margin of full's {key} {f['mean']:.4g} (closest: "
                f"r = {int(best['rank'])} at {best['mean']:.4g})")


def _rate_searched(metrics: pd.DataFrame) -> bool:
    """Whether every full run's learning rate was chosen by the search (``lr_searched``)."""
    full = metrics[metrics["method"] == "full"]
    return "lr_searched" in metrics and len(full) > 0 and bool(
        full["lr_searched"].fillna(False).astype(bool).all())


def functional_rank(summary: pd.DataFrame | None, modules: pd.DataFrame | None) -> dict:
    """k₉₀ of the full update from the k = 0 baseline, against min(d) and the noise floor."""
    gate = "full gained, full plateaued"
    full = summary[(summary["method"] == "full") & (summary["share"].round(2) == 0.9)] \
        if summary is not None and len(summary) else pd.DataFrame()
    if full.empty:
        return _row("functional rank", "skipped", gate=gate, note="no truncation test of a full run")
    dmin = _median_min_dim(modules)
    floor = _median(modules, "energy_rank_90_noise", method="full")
    k = None if full["k"].isna().any() else float(full["k"].median())
    tested = int(full["k_max"].max()) if "k_max" in full else None
    low = max(1, int(dmin * LOW_SHARE)) if dmin else None
    high = int(dmin * HIGH_SHARE) if dmin else None
    k0 = _median(full, "k0_share")
    base = f"; the k = 0 baseline (non-linear weights only) keeps {k0:.0%} of the gain" \
        if k0 is not None else ""
    if k is None and k0 is not None and k0 >= 0.9:
        return _row("functional rank", "inconclusive", None, low, gate, "the non-linear weights "
                    f"alone keep {k0:.0%} of the gain, so the linear update's rank carries little "
                    "of it: train with full_scope: linear")
    if k is None:
        return _row("functional rank", "high", None, high, gate, f"90% of the gain not reached "
                    f"up to k = {tested}" + base)
    under_floor = floor is None or k < floor
    status = "low" if low and k <= low and under_floor else "high" if high and k >= high \
        else "between"
    return _row("functional rank", status, k, low, gate, f"k₉₀ = {k:.0f} of min(d) = {dmin}; "
                f"a Gaussian matrix's k₉₀ = {floor if floor is not None else 'n/a'}" + base)


def shared_direction(subspace: pd.DataFrame | None) -> dict:
    """Median φ(1, 1) between LoRA ranks on the column space, against its null's 99% quantile."""
    if subspace is None or not len(subspace) or "null_q99" not in subspace:
        return _row("shared direction", "skipped", note="no φ table with null quantiles")
    top = subspace[(subspace["pair"] == "ranks") & (subspace["i"] == 1)
                   & (subspace["side"] == "left")]
    if top.empty:
        return _row("shared direction", "skipped", note="no pair of LoRA ranks")
    phi, q99 = float(top["phi"].median()), float(top["null_q99"].median())
    return _row("shared direction", "pass" if phi > q99 else "fail", phi, q99, "LoRA gained",
                f"median φ(1, 1) = {phi:.3f} against the null's 99% quantile {q99:.3f}")


def verdict_table(frames: dict[str, pd.DataFrame]) -> tuple[str, pd.DataFrame]:
    """The outcome ("holds", "refuted", "inconclusive") and the table of gates and tests."""
    metrics = frames["metrics"]
    rows = gates(metrics) + [equivalence(metrics),
                             functional_rank(frames.get("truncation_summary"), frames.get("modules")),
                             shared_direction(frames.get("subspace"))]
    table = pd.DataFrame(rows, columns=COLUMNS)
    failed = set(table.loc[table["test"].isin(GATES) & (table["status"] != "pass"), "test"])
    for i, r in table.iterrows():         # a failed gate makes the tests that need it inconclusive
        needs = {g.strip() for g in str(r["gate"]).split(",")} & failed
        if needs and r["status"] != "skipped":
            table.loc[i, "note"] = f"gate failed ({', '.join(sorted(needs))}); " + str(r["note"])
            table.loc[i, "status"] = "inconclusive"
    return _outcome(table), table


def _outcome(t: pd.DataFrame) -> str:
    status = dict(zip(t["test"], t["status"]))
    if (t["test"].isin(GATES) & (t["status"] != "pass")).any():
        return "inconclusive"
    eq, fr, sd = status.get("equivalence"), status.get("functional rank"), status.get("shared direction")
    if eq == "pass" and fr == "low" and sd in ("pass", "skipped"):
        return "holds"
    if eq == "fail" and t.loc[t["test"] == "equivalence", "value"].isna().all() and fr == "high":
        return "refuted"
    return "inconclusive"


def _median(df: pd.DataFrame | None, col: str, **where) -> float | None:
    if df is None or col not in df:
        return None
    for k, v in where.items():
        df = df[df[k] == v]
    vals = df[col].dropna()
    return None if vals.empty else float(vals.median())


def _median_min_dim(modules: pd.DataFrame | None) -> int | None:
    if modules is None or not len(modules):
        return None
    full = modules[modules["method"] == "full"]
    full = full if len(full) else modules
    return int(full[["d_out", "d_in"]].min(axis=1).median())
