"""The verdict on the low-intrinsic-rank hypothesis: holds, refuted or inconclusive.

Built only from a sweep's tables, by tests declared here before any number is seen
(docs/science.md, "A verdict that can fail"). Each test has a value, a threshold and the gate
it needs; a failed gate makes its test inconclusive, never a pass:

* **gates** — full fine-tuning gained over the base model and plateaued (the last fifth of its
  learning-rate schedule made at most ``PLATEAU_MAX`` of its gain); the LoRA runs a test reads
  gained and trained stably (no training loss risen over its last fifth by more than
  ``RISE_MAX``; no rank worse than the smallest rank beyond the margin).
* **equivalence** — two one-sided tests on a paired bootstrap interval over held-out examples
  and seeds (``analysis.equivalence``), with the margin the sweep's config fixed before its
  runs, Holm-corrected over the ranks scanned: the smallest LoRA rank whose whole 90% interval
  of (LoRA − full) lies inside ±margin. A wide interval is inconclusive, never a pass, and
  says how many examples would narrow it. A rank that *beats* full fine-tuning beyond the
  margin counts (as "at least as good") only when full fine-tuning's rate was chosen on a
  validation split (``--lr-search``); at a rate set by hand it makes the test inconclusive,
  since the full run may simply have been trained badly.
* **functional rank** — k₉₀ of the truncation test measured from the k = 0 baseline (linear
  weights at W₀, the rest fine-tuned), against min(d_out, d_in) and against the k₉₀ of a
  Gaussian matrix of the same shape (the noise floor).
* **shared direction** — median φ of the top direction between LoRA ranks (column space) above
  its null's 99% quantile.

*Holds*: no gate fails, equivalence passes at r ≤ ``LOW_RANK``, the functional rank is low, and
every other test that ran passes. *Refuted*: no gate fails, no tested rank is equivalent (every
one worse beyond the margin, or equivalent only at r ≥ min(d)/4) and the functional rank is
high. Anything else is *inconclusive*, with the failed gate or test named
and what to run next.
"""
from __future__ import annotations

import pandas as pd

from rankscope.analysis.equivalence import against_rank, equivalence_scan, smallest_equivalent

PLATEAU_MAX = 0.15      # share of full fine-tuning's gain allowed in the last fifth of its
                        # learning-rate schedule (rankscope.train.evidence.late_step)
DEFAULT_MARGIN = 0.03   # the equivalence margin of runs that record none (config default)
RISE_MAX = 0.10         # a LoRA run whose training loss rose more over its last fifth is unstable
LOW_RANK = 16           # the largest r that counts as "a small r" for equivalence
LOW_SHARE = 1 / 8       # functional k₉₀ at most this share of min(d_out, d_in) is "low" …
HIGH_SHARE = 1 / 4      # … and at least this share (or not reached) is "high"
COLUMNS = ["test", "status", "value", "threshold", "gate", "note"]
GATES = ("full gained", "full plateaued", "LoRA gained", "LoRA stable")
NOT_BEST_LEARNER = "full fine-tuning is not the best learner"   # LoRA beat it at a hand-set rate
OK_GATE = ("pass", "skipped")    # a gate with nothing to read is no failure; its note says so


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


def gates(metrics: pd.DataFrame, examples: pd.DataFrame | None = None) -> list[dict]:
    """Full fine-tuning gained and plateaued; the LoRA runs gained and trained stably
    (``stability``; "skipped" for runs that record nothing to judge it by). One row per gate."""
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
        rows.append(stability(metrics, examples))
    return rows


def equivalence_setup(metrics: pd.DataFrame, examples: pd.DataFrame) -> tuple[str, bool, float]:
    """The compared column, whether higher is better, and the margin δ in its units.

    The sweep's config fixed them before its runs (``equivalence_metric``,
    ``equivalence_margin``, recorded in every manifest): accuracy compares each example's 1/0
    hit and δ is in accuracy points; loss compares each example's held-out loss and δ is the
    margin's share of full fine-tuning's gain in loss over the base model ("auto": accuracy
    for classification) — a share of the gain, not of the loss, so that a task whose loss
    falls towards 0 (the planted control) has a margin at the scale of what training moved.
    """
    metric, margin = declared_margin(metrics)
    has_hits = "correct" in examples and examples["correct"].notna().any()
    if metric == "accuracy" or (metric == "auto" and has_hits):
        return "correct", True, margin
    return "loss", False, margin * loss_gain(examples, reference="full")


def loss_gain(examples: pd.DataFrame, *, reference: str | int) -> float:
    """|base − reference| of the mean per-example held-out loss; the reference is full
    fine-tuning ("full") or a LoRA rank. 1.0 when either is missing (the margin is then read
    in loss units)."""
    base = examples.loc[examples["method"] == "base", "loss"]
    ref = examples.loc[examples["method"] == "full", "loss"] if reference == "full" else \
        examples.loc[(examples["method"] == "lora") & (examples["rank"] == reference), "loss"]
    gain = abs(float(base.mean()) - float(ref.mean())) if len(base) and len(ref) else 1.0
    return gain if gain > 0 else 1.0


def declared_margin(metrics: pd.DataFrame) -> tuple[str, float]:
    """The equivalence metric and margin the runs' config declared (the defaults for runs that
    record none)."""
    def first(col: str, default):
        vals = metrics[col].dropna() if col in metrics else pd.Series(dtype=object)
        return vals.iloc[0] if len(vals) else default

    return str(first("equivalence_metric", "auto")), float(first("equivalence_margin",
                                                                 DEFAULT_MARGIN))


def equivalence(metrics: pd.DataFrame, examples: pd.DataFrame | None,
                modules: pd.DataFrame | None = None) -> tuple[dict, list[dict]]:
    """The smallest LoRA rank equivalent to full fine-tuning by the interval test, as a verdict
    row, and one row per rank with its interval (``analysis.equivalence``).

    pass: the smallest equivalent rank is ≤ ``LOW_RANK``; fail: every rank is worse than full
    fine-tuning beyond the margin, or the smallest equivalent one is ≥ min(d)/4 (a rank that is
    not low); inconclusive: intervals too wide to tell, one seed, a larger rank that only beats
    a full run trained at a hand-set rate, or a smallest equivalent rank between the two.
    "Better than full beyond the margin" counts as at least as good only when full
    fine-tuning's rate was chosen on a validation split.
    """
    gate = "full gained, full plateaued"
    if examples is None or examples.empty or not (examples["method"] == "lora").any() \
            or not (examples["method"] == "full").any():
        if not ((metrics["method"] == "full").any() and (metrics["method"] == "lora").any()):
            return _row("equivalence", "skipped", gate=gate, note="needs full and LoRA runs"), []
        return _row("equivalence", "inconclusive", gate=gate, note="the runs record no "
                    "per-example held-out numbers to pair: train them with this rankscope"), []
    col, higher, margin = equivalence_setup(metrics, examples)
    scan = equivalence_scan(examples, metric=col, higher=higher, margin=margin)
    key = "accuracy" if col == "correct" else "loss"
    per_rank = [_row(f"equivalence r = {r.rank}", r.status, r.diff, r.margin, gate,
                     f"LoRA − full {key} {r.diff:+.3g}, 90% interval [{r.lo:+.3g}, {r.hi:+.3g}] "
                     f"over {r.n_seeds} seeds × {r.n_examples} examples; Holm p {r.p_holm:.3g}; "
                     f"the smallest margin this data can show: ±{r.detectable:.3g}")
                for r in scan.itertuples()]
    seeds = int(scan["n_seeds"].min())
    widest = scan.loc[scan["status"] == "inconclusive"]
    if seeds < 2:
        return _row("equivalence", "inconclusive", None, LOW_RANK, gate,
                    "one seed: the interval covers examples only; run at least two seeds "
                    "(--seeds 0,1,2)"), per_rank
    dmin = _median_min_dim(modules)
    not_low = dmin // 4 if dmin else None
    r_eq = smallest_equivalent(scan, better_counts=_rate_searched(metrics))
    head = f"margin ±{margin:.3g} {key} (fixed before the runs)"
    if r_eq is not None:
        status = "pass" if r_eq <= LOW_RANK and (not_low is None or r_eq < not_low) else \
            "fail" if not_low is not None and r_eq >= not_low else "inconclusive"
        how = scan.set_index("rank").loc[r_eq, "status"]
        beats = " (better beyond the margin, at full fine-tuning's searched rate: at least as " \
                "good)" if how == "better" else ""
        return _row("equivalence", status, r_eq, LOW_RANK, gate,
                    f"LoRA r = {r_eq} is equivalent to full fine-tuning{beats}; {head}"), per_rank
    better = scan[scan["status"] == "better"]
    if len(better):
        return _row("equivalence", "inconclusive", None, LOW_RANK, gate,
                    f"LoRA r = {int(better['rank'].min())} beats full fine-tuning beyond the "
                    f"margin: {NOT_BEST_LEARNER} at its rate and scope, so no rank can be said "
                    f"to match it; {head}"), per_rank
    if (scan["status"] == "worse").all():
        return _row("equivalence", "fail", None, LOW_RANK, gate,
                    f"every LoRA rank up to r = {int(scan['rank'].max())} is worse than full "
                    f"fine-tuning beyond the margin; {head}"), per_rank
    w = widest.sort_values("detectable").iloc[0]
    where = (f"its difference {w['diff']:+.3g} already lies beyond the margin, so more data "
             "would more likely show it worse than equivalent; a larger rank may match"
             if abs(w["diff"]) >= margin else
             f"about {int(w['n_needed'])} held-out examples (or more seeds) would narrow it to "
             "the margin")
    return _row("equivalence", "inconclusive", None, LOW_RANK, gate,
                f"no rank decided: the narrowest inconclusive interval (r = {int(w['rank'])}) "
                f"could show ±{w['detectable']:.3g}, and {where}; {head}"), per_rank


def stability(metrics: pd.DataFrame, examples: pd.DataFrame | None) -> dict:
    """The LoRA runs trained stably: no training loss risen over its last fifth by more than
    ``RISE_MAX``, and no rank's held-out metric worse than the smallest rank's beyond the
    equivalence margin (the paired interval of ``analysis.equivalence``)."""
    lora = metrics[metrics["method"] == "lora"]
    rise = pd.to_numeric(lora.get("late_train_rise"), errors="coerce") \
        if "late_train_rise" in lora else pd.Series(dtype=float)
    risen = lora.loc[rise > RISE_MAX, "run"].tolist() if len(rise) else []
    worse = []
    if examples is not None and len(examples) and (examples["method"] == "lora").any():
        col, higher, margin = equivalence_setup(metrics, examples)
        smallest = int(examples.loc[examples["method"] == "lora", "rank"].min())
        scan = against_rank(examples, smallest, metric=col, higher=higher, margin=margin)
        worse = [f"r = {int(r)}" for r in scan.loc[scan["status"] == "worse", "rank"]]
    if rise.isna().all() and not worse and (examples is None or examples.empty):
        return _row("LoRA stable", "skipped", note="the runs record neither their training "
                    "loss's late rise nor per-example held-out numbers")
    bad = risen + worse
    note = ("unstable: " + "; ".join(
        ([f"training loss rose > {RISE_MAX:.0%} over the last fifth: " + ", ".join(risen)]
         if risen else []) + ([f"held-out metric worse than the smallest rank's beyond the "
                               f"margin: {', '.join(worse)}"] if worse else []))
            if bad else "no LoRA run's training loss rose over its last fifth, and no rank is "
                        "worse than the smallest beyond the margin")
    return _row("LoRA stable", "fail" if bad else "pass", len(bad), 0, note=note)


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
    metrics, examples = frames["metrics"], frames.get("examples")
    eq, per_rank = equivalence(metrics, examples, frames.get("modules"))
    rows = gates(metrics, examples) + [eq] + per_rank + [
        functional_rank(frames.get("truncation_summary"), frames.get("modules")),
        shared_direction(frames.get("subspace"))]
    table = pd.DataFrame(rows, columns=COLUMNS)
    failed = set(table.loc[table["test"].isin(GATES) & ~table["status"].isin(OK_GATE), "test"])
    for i, r in table.iterrows():         # a failed gate makes the tests that need it inconclusive
        needs = {g.strip() for g in str(r["gate"]).split(",")} & failed
        if needs and r["status"] != "skipped":
            table.loc[i, "note"] = f"gate failed ({', '.join(sorted(needs))}); " + str(r["note"])
            table.loc[i, "status"] = "inconclusive"
    return _outcome(table), table


def _outcome(t: pd.DataFrame) -> str:
    status = dict(zip(t["test"], t["status"]))
    if (t["test"].isin(GATES) & ~t["status"].isin(OK_GATE)).any():
        return "inconclusive"
    eq, fr, sd = status.get("equivalence"), status.get("functional rank"), status.get("shared direction")
    if eq == "pass" and fr == "low" and sd in ("pass", "skipped"):
        return "holds"
    if eq == "fail" and fr == "high":
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
