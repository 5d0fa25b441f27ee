"""Whether a figure reproduces its published result "in shape", by criteria written as numbers.

An experiment YAML's ``in_shape`` lists the published shape as checks on the figure's own data
(the CSV that is drawn), written before any run is read. A check is one of three kinds.

Row by row: each selected row compared with numbers or with columns of the same row.

    - what: ΔW's ‖UᵀWV‖_F above its random null's 99% quantile and below W's own, per rank
      rows: "directions.str.startswith('ΔW')"   # a pandas query selecting rows of the data
      value: value                   # the column measured
      above: [random_q99]            # each a number or a column, compared row by row
      below: [w_own]
      holds: all                     # all (default) or any of the selected rows must pass

Reduced: the rows reduced to one number (``over``: max, min, median, spread = max − min,
rel_spread = (max − min)/|median|), or to one number per group of ``by`` (a column), each
compared with numbers or with other rows reduced the same way; ``holds`` then counts groups.

    - what: held-out loss of r = 1 above the plateau's
      rows: "method == 'lora' and rank == 1"
      value: value
      over: min
      above: {rows: "method == 'lora' and rank >= 16", over: max}   # other rows, reduced
                                     # (times: f scales it; value: another column)
    - what: each full run keeps ≥ 90% of its gain at some k ≤ min(d)/8
      rows: "k_share <= 0.125"
      value: value
      by: run                        # one number per run: its max over the rows
      over: max
      above: 0.9

Trend: ``trend: decreasing`` (or ``increasing``) of ``value`` against the column ``x``, over
the selected rows (several rows per x, e.g. one per seed, are kept as they are). It holds when
Spearman's rank correlation ρ of value with x (ties take their mean rank) is ≤ −TREND_RHO
(decreasing; ≥ +TREND_RHO increasing) *and* the median at the largest x is below the median
at the smallest x (above, increasing) by more than ``margin`` (default 0) times |the latter|.
ρ alone lets a series rise at its ends while falling in between; the ends alone read two
points. Fewer than TREND_MIN_X distinct x values read no trend ("no data"); a flat series has
no ρ and fails. ``measured`` records ρ and both medians.

    - what: intruder dimensions fall as r grows
      rows: "method == 'lora' and series == 'ε = 0.5'"
      value: value
      trend: decreasing
      x: rank

Any check may add ``needs: {column: n}``: its rows must hold ≥ n distinct values of each
column, else it read too little to say ("no data": e.g. a statistic of one layer), and
``sanity: true``: a check that holds by construction (a random pair below its own null) is
evaluated and reported but is no evidence, so ``reproduced`` leaves it out.

A figure is reproduced ``yes`` when every check (sanity checks aside) holds, ``partly`` when
some do, ``no`` when none does, ``untested`` when none found rows to read, and
``inconclusive``, whatever its checks say, when a training gate of the runs it reads
(``figure_gates``) did not pass: a shape measured on runs that did not train proves nothing.
"""
from __future__ import annotations

import math

import pandas as pd

from rankscope.analysis.verdict import gates
from rankscope.errors import InputError

KEYS = ("what", "rows", "value", "above", "below", "holds", "over", "by", "trend", "x",
        "margin", "needs", "sanity")
OVER = {"max": lambda v: v.max(), "min": lambda v: v.min(), "median": lambda v: v.median(),
        "spread": lambda v: v.max() - v.min(),
        "rel_spread": lambda v: (v.max() - v.min()) / abs(v.median())}
TRENDS = ("decreasing", "increasing")
TREND_RHO = 0.5         # |Spearman ρ| a trend needs: a moderate monotone association
TREND_MIN_X = 3         # distinct x values a trend needs: two points are a comparison
A_MOVED_MIN = 0.5       # LoRA's A must have moved this share of its initial norm (φ on A)
SHOWN = 6               # measured values listed per check (panels), the rest summarised


def check_criteria(doc, where: str) -> list[dict]:
    """The ``in_shape`` list of an experiment, validated.

    Raises:
        InputError: not a list of mappings, an unknown key, no ``what``/``value``, neither
            ``above``/``below`` nor ``trend``, a bad ``holds``/``over``/``by``/``trend``/``x``/
            ``margin``/``needs``/``sanity``, or a bound that is neither a number nor a column.
    """
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise InputError(f"{where}: in_shape must be a list of checks")
    out = []
    for i, c in enumerate(doc):
        at = f"{where}: in_shape[{i}]"
        if not isinstance(c, dict):
            raise InputError(f"{at}: must be a mapping")
        bad = sorted(set(c) - set(KEYS))
        if bad:
            raise InputError(f"{at}: unknown key {bad[0]!r}; known: {', '.join(KEYS)}")
        for key in ("what", "value"):
            if not isinstance(c.get(key), str) or not c[key]:
                raise InputError(f"{at}: {key!r} must be a non-empty text")
        if not isinstance(c.get("sanity", False), bool):
            raise InputError(f"{at}: sanity must be true or false, got {c['sanity']!r}")
        needs = _check_needs(c.get("needs"), at)
        if "trend" in c:
            out.append({**_check_trend(c, at), "needs": needs, "sanity": c.get("sanity", False)})
            continue
        for key in ("x", "margin"):
            if key in c:
                raise InputError(f"{at}: {key!r} belongs to a trend check (give 'trend')")
        if "above" not in c and "below" not in c:
            raise InputError(f"{at}: give 'above' or 'below' (numbers or columns), or 'trend'")
        if c.get("holds", "all") not in ("all", "any"):
            raise InputError(f"{at}: holds must be 'all' or 'any', got {c['holds']!r}")
        over = c.get("over")
        if over is not None and over not in OVER:
            raise InputError(f"{at}: over must be one of {', '.join(OVER)}, got {over!r}")
        by = c.get("by")
        if by is not None and (not isinstance(by, str) or not by or over is None):
            raise InputError(f"{at}: by takes a column name and needs 'over' (one number per "
                             f"group), got {by!r}")
        bounds = {side: _check_bounds(c.get(side, []), over, f"{at}: {side}")
                  for side in ("above", "below")}
        out.append({"what": c["what"], "rows": c.get("rows"), "value": c["value"], **bounds,
                    "holds": c.get("holds", "all"), "over": over, "by": by, "trend": None,
                    "x": None, "margin": 0.0, "needs": needs, "sanity": c.get("sanity", False)})
    return out


def _check_bounds(values, over: str | None, at: str) -> list:
    values = values if isinstance(values, list) else [values]
    for v in values:
        if isinstance(v, dict) and over:
            _check_reference(v, at)
        elif isinstance(v, bool) or not isinstance(v, (int, float, str)) or (
                over and isinstance(v, str)):
            kinds = "numbers or {rows, over} mappings" if over else "numbers or column names"
            raise InputError(f"{at} takes {kinds}, got {v!r}")
    return values


def _check_trend(c: dict, at: str) -> dict:
    if c["trend"] not in TRENDS:
        raise InputError(f"{at}: trend must be one of {', '.join(TRENDS)}, got {c['trend']!r}")
    if not isinstance(c.get("x"), str) or not c["x"]:
        raise InputError(f"{at}: a trend needs 'x', the column it runs along (e.g. rank)")
    mixed = [k for k in ("above", "below", "over", "by", "holds") if k in c]
    if mixed:
        raise InputError(f"{at}: a trend check takes no {mixed[0]!r} (it is judged by ρ and "
                         "its ends)")
    margin = c.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0:
        raise InputError(f"{at}: margin must be a number ≥ 0, got {margin!r}")
    return {"what": c["what"], "rows": c.get("rows"), "value": c["value"], "above": [],
            "below": [], "holds": "all", "over": None, "by": None, "trend": c["trend"],
            "x": c["x"], "margin": float(margin)}


def _check_needs(needs, at: str) -> dict:
    if needs is None:
        return {}
    if not isinstance(needs, dict) or not needs or not all(
            isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 1
            for k, n in needs.items()):
        raise InputError(f"{at}: needs maps columns to counts ≥ 1 of distinct values, "
                         f"e.g. {{layer: 3}}; got {needs!r}")
    return dict(needs)


def _check_reference(ref: dict, at: str) -> None:
    bad = sorted(set(ref) - {"rows", "over", "value", "times"})
    if bad or not isinstance(ref.get("rows"), str) or ref.get("over") not in OVER:
        raise InputError(f"{at}: a bound from other rows needs 'rows' (a query) and 'over' "
                         f"({', '.join(OVER)}), optionally 'value' and 'times'; got {ref!r}")
    if isinstance(ref.get("times", 1), bool) or not isinstance(ref.get("times", 1), (int, float)):
        raise InputError(f"{at}: times must be a number, got {ref['times']!r}")


def _reference(df: pd.DataFrame, ref: dict, value: str) -> float:
    """A bound made of other rows: ``over`` of their ``value`` column, times ``times``."""
    try:
        rows = df.query(ref["rows"], engine="python")
    except Exception:  # noqa: BLE001 - a query on columns this figure lacks
        return math.nan
    col = ref.get("value", value)
    v = pd.to_numeric(rows[col], errors="coerce").dropna() if col in rows else pd.Series([])
    return float(OVER[ref["over"]](v)) * float(ref.get("times", 1)) if len(v) else math.nan


def _bound(df: pd.DataFrame, b) -> pd.Series:
    if isinstance(b, str):
        if b not in df:
            return pd.Series(math.nan, index=df.index)
        return pd.to_numeric(df[b], errors="coerce")
    return pd.Series(float(b), index=df.index)


def evaluate(df: pd.DataFrame, criteria: list[dict]) -> list[dict]:
    """Each check on the figure data: its status and the numbers it read.

    Returns:
        One dict per check: its keys (``what``, ``value``, bounds, ``trend``, ``sanity``, …),
        ``status`` ("yes", "no", or "no data" when its rows or columns are missing or too few,
        with a ``note``), ``measured`` ({panel, group or statistic: value}, the first ``SHOWN``
        rows or a summary of them), ``passed`` / ``rows`` (counts: rows, groups or points).
    """
    return [{**_head(c), **_evaluate(df, c)} for c in criteria]


def _evaluate(df: pd.DataFrame, c: dict) -> dict:
    rows = df
    if c["rows"]:
        try:
            rows = df.query(c["rows"], engine="python")
        except Exception as e:  # noqa: BLE001 - a query on columns this figure lacks
            return {"status": "no data", "note": f"rows: {e}"}
    needs = c.get("needs") or {}
    named = [c["value"], *c["above"], *c["below"], c.get("x"), c.get("by"), *needs]
    lacking = [b for b in named if isinstance(b, str) and b not in rows]
    if lacking or rows.empty:
        return {"status": "no data", "note": f"no column {lacking[0]}" if lacking else "no rows"}
    for col, n in needs.items():
        have = int(rows[col].nunique())
        if have < n:
            return {"status": "no data", "note": f"rows hold {have} value(s) of {col}; the "
                                                 f"check needs {n}"}
    if c.get("trend"):
        return _trend(rows, c)
    if c["over"]:
        return _reduced(df, rows, c)
    value = pd.to_numeric(rows[c["value"]], errors="coerce")
    ok = value.notna()
    for b in c["above"]:
        bound = _bound(rows, b)
        ok &= bound.notna() & (value > bound)
    for b in c["below"]:
        bound = _bound(rows, b)
        ok &= bound.notna() & (value < bound)
    held = bool(ok.any()) if c["holds"] == "any" else bool(ok.all())
    return {"status": "yes" if held else "no", "passed": int(ok.sum()), "rows": int(len(rows)),
            "measured": _measured(rows, value)}


def _reduced(df: pd.DataFrame, rows: pd.DataFrame, c: dict) -> dict:
    """``over`` of the rows (or of each group of ``by``) against its bounds."""
    value = pd.to_numeric(rows[c["value"]], errors="coerce")
    if value.dropna().empty:
        return {"status": "no data", "note": "no numbers"}
    reduce = OVER[c["over"]]
    above = [_reference(df, b, c["value"]) if isinstance(b, dict) else float(b)
             for b in c["above"]]
    below = [_reference(df, b, c["value"]) if isinstance(b, dict) else float(b)
             for b in c["below"]]
    if any(math.isnan(b) for b in above + below):
        return {"status": "no data", "note": "no rows for a bound"}
    bounds = {}
    if any(isinstance(x, dict) for x in c["above"] + c["below"]):
        bounds = {f"bound {i + 1}": _num(b) for i, b in enumerate(above + below)}
    if c.get("by"):
        got = value.groupby(rows[c["by"]], sort=True).agg(
            lambda v: float(reduce(v.dropna())) if v.notna().any() else math.nan)
        ok = got.notna() & got.apply(lambda g: all(g > b for b in above)
                                     and all(g < b for b in below)).astype(bool)
        held = bool(ok.any()) if c["holds"] == "any" else bool(ok.all())
        shown = {f"{c['by']} {k}": _num(v) for k, v in list(got.items())[:SHOWN]}
        return {"status": "yes" if held else "no", "passed": int(ok.sum()),
                "rows": int(len(got)), "measured": shown | bounds}
    got = float(reduce(value.dropna()))
    held = all(got > b for b in above) and all(got < b for b in below)
    measured = {c["over"]: _num(got)} | bounds
    if c["over"] == "median":       # a median with its spread
        measured |= {"min": _num(value.min()), "max": _num(value.max())}
    return {"status": "yes" if held else "no", "passed": int(held), "rows": int(len(rows)),
            "measured": measured | {"n": int(value.notna().sum())}}


def spearman(x: pd.Series, y: pd.Series) -> float:
    """Spearman's rank correlation of two equal-length series (scipy's, mean ranks for ties);
    NaN when either is constant."""
    if x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    from scipy.stats import spearmanr

    return float(spearmanr(x.to_numpy(float), y.to_numpy(float)).statistic)


def _trend(rows: pd.DataFrame, c: dict) -> dict:
    """``trend`` of value along x: Spearman's ρ and the medians at the ends (module docstring)."""
    x = pd.to_numeric(rows[c["x"]], errors="coerce")
    y = pd.to_numeric(rows[c["value"]], errors="coerce")
    keep = x.notna() & y.notna()
    x, y = x[keep], y[keep]
    if x.nunique() < TREND_MIN_X:
        return {"status": "no data", "note": f"{x.nunique()} value(s) of {c['x']}; a trend "
                                             f"needs {TREND_MIN_X}"}
    rho = spearman(x, y)
    lo, hi = x.min(), x.max()
    start, end = float(y[x == lo].median()), float(y[x == hi].median())
    step = c["margin"] * abs(start)
    if c["trend"] == "decreasing":
        held = rho <= -TREND_RHO and end < start - step
    else:
        held = rho >= TREND_RHO and end > start + step
    held = bool(held) and not math.isnan(rho)
    measured = {"spearman": _num(rho), f"median at {c['x']} {lo:g}": _num(start),
                f"median at {c['x']} {hi:g}": _num(end), "n": int(len(y))}
    return {"status": "yes" if held else "no", "passed": int(held), "rows": int(len(y)),
            "measured": measured}


def _head(c: dict) -> dict:
    head = {k: c.get(k) for k in ("what", "value", "above", "below", "holds", "over")}
    extra = {k: c[k] for k in ("by", "trend", "x", "needs") if c.get(k)}
    if c.get("trend") and c.get("margin"):
        extra["margin"] = c["margin"]
    return head | extra | {"sanity": bool(c.get("sanity", False))}


def _measured(rows: pd.DataFrame, value: pd.Series) -> dict:
    labels = rows["panel"].astype(str) if "panel" in rows else pd.Series(
        [str(i) for i in rows.index], index=rows.index)
    if len(rows) <= SHOWN:
        return {f"{lab} #{k}" if (labels == lab).sum() > 1 else lab: _num(v)
                for k, (lab, v) in enumerate(zip(labels, value))}
    return {"min": _num(value.min()), "median": _num(value.median()), "max": _num(value.max()),
            "n": int(len(value))}


def _num(v) -> float | None:
    return None if pd.isna(v) else float(f"{float(v):.4g}")      # 4 significant digits


NOT_BLOCKING = ("pass", "skipped")     # a gate "skipped" had nothing to judge (verdict.gates)


def failed_gate_rows(gate_rows) -> list[dict]:
    """The gate rows that did not pass: failed, or inconclusive (not shown to pass)."""
    return [g for g in gate_rows or () if g["status"] not in NOT_BLOCKING]


def failed_gates(gate_rows) -> list[str]:
    return sorted({g["gate"] for g in failed_gate_rows(gate_rows)})


def reproduced(checks: list[dict], gate_rows: list[dict] | tuple = ()) -> str:
    """``inconclusive`` when a gate of ``gate_rows`` (``figure_gates``) did not pass, whatever
    the checks say; else ``yes`` (every check held, sanity checks aside), ``partly``, ``no``
    (none did) or ``untested`` (none ran)."""
    if failed_gates(gate_rows):
        return "inconclusive"
    evidence = [c for c in checks if not c.get("sanity")]
    ran = [c for c in evidence if c["status"] in ("yes", "no")]
    if not ran:
        return "untested"
    held = sum(c["status"] == "yes" for c in ran)
    if held == len(evidence):
        return "yes"
    return "partly" if held else "no"


def figure_gates(results: dict[str, dict]) -> list[dict]:
    """The training gates of every sweep a figure reads: full gained and plateaued, LoRA
    gained (``verdict.gates``), and LoRA's A moved ≥ ``A_MOVED_MIN`` of its initial norm on
    every module (``a_moved_min`` of each run; without A₀ saved, "inconclusive").

    Returns:
        One dict per sweep and gate: ``sweep, gate, status, value, threshold``.
    """
    rows = []
    for label, tables in results.items():
        metrics = tables.get("metrics")
        if metrics is None or metrics.empty:
            rows.append({"sweep": label, "gate": "runs", "status": "inconclusive", "value": None,
                         "threshold": None})
            continue
        for g in gates(metrics, tables.get("examples")):
            rows.append({"sweep": label, "gate": g["test"], "status": g["status"],
                         "value": _num(g["value"]) if g["value"] is not None else None,
                         "threshold": g["threshold"]})
        lora = metrics[metrics["method"] == "lora"]
        if len(lora):
            moved = pd.to_numeric(lora.get("a_moved_min"), errors="coerce")
            status = ("inconclusive" if moved.isna().all() else
                      "pass" if bool((moved >= A_MOVED_MIN).all()) else "fail")
            rows.append({"sweep": label, "gate": "LoRA A moved", "status": status,
                         "value": _num(moved.min()), "threshold": A_MOVED_MIN})
    return rows


def caption_note(status: str, checks: list[dict], gate_rows: list[dict]) -> str:
    """The caption's last sentence: reproduced or not, with the checks and the gates."""
    evidence = [c for c in checks if not c.get("sanity")]
    sanity = [c for c in checks if c.get("sanity")]
    held = sum(c["status"] == "yes" for c in evidence)
    sane = (f"; sanity checks: {sum(c['status'] == 'yes' for c in sanity)} of {len(sanity)} held"
            if sanity else "")
    failed = failed_gates(gate_rows)
    gates_text = ("every gate passed" if not failed else
                  "gates not passed: " + ", ".join(failed) + " (the shape is not evidence)")
    return (f"Reproduced in shape: {status} ({held} of {len(evidence)} checks{sane}); "
            f"{gates_text}.")
