"""Whether a figure reproduces its published result "in shape", by criteria written as numbers.

An experiment YAML's ``in_shape`` lists the published shape as checks on the figure's own data
(the CSV that is drawn), written before any run is read:

    in_shape:
      - what: φ(1, 1) > 0.5 and above its null's 99% quantile, column or row space
        rows: "i == 1 and j == 1"      # a pandas query selecting rows of the figure data
        value: phi                     # the column measured
        above: [0.5, null_q99]         # each a number or a column, compared row by row
        holds: any                     # any (default: all) of the selected rows must pass
      - what: held-out loss flat from r = 16 (within 1% of its median)
        rows: "method == 'lora' and rank >= 16"
        value: value
        over: rel_spread               # reduce the rows first: max, min, median, spread
        below: 0.01                    # (max − min) or rel_spread ((max − min)/|median|)
      - what: r = 1's loss above the plateau
        rows: "method == 'lora' and rank == 1"
        value: value
        over: min
        above: {rows: "method == 'lora' and rank >= 16", over: max}   # other rows, reduced
                                       # (times: f scales it; value: another column)

A figure is reproduced ``yes`` when every check holds, ``partly`` when some do, ``no`` when
none does, and ``untested`` when no check found rows to read. Beside it stand the gates of the
runs it reads (``figure_gates``): a shape measured on runs that did not train proves nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from rankscope.analysis.verdict import gates
from rankscope.errors import InputError
from rankscope.store.atomic import atomic_write_text
from rankscope.train.config import PROFILES

KEYS = ("what", "rows", "value", "above", "below", "holds", "over")
OVER = {"max": lambda v: v.max(), "min": lambda v: v.min(), "median": lambda v: v.median(),
        "spread": lambda v: v.max() - v.min(),
        "rel_spread": lambda v: (v.max() - v.min()) / abs(v.median())}
A_MOVED_MIN = 0.5       # LoRA's A must have moved this share of its initial norm (φ on A)
SHOWN = 6               # measured values listed per check (panels), the rest summarised


def check_criteria(doc, where: str) -> list[dict]:
    """The ``in_shape`` list of an experiment, validated.

    Raises:
        InputError: not a list of mappings, an unknown key, no ``what``/``value``, neither
            ``above`` nor ``below``, a bad ``holds``, or a bound that is neither a number nor a
            column name.
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
        if "above" not in c and "below" not in c:
            raise InputError(f"{at}: give 'above' or 'below' (numbers or columns)")
        if c.get("holds", "all") not in ("all", "any"):
            raise InputError(f"{at}: holds must be 'all' or 'any', got {c['holds']!r}")
        over = c.get("over")
        if over is not None and over not in OVER:
            raise InputError(f"{at}: over must be one of {', '.join(OVER)}, got {over!r}")
        bounds = {}
        for side in ("above", "below"):
            values = c.get(side, [])
            values = values if isinstance(values, list) else [values]
            for v in values:
                if isinstance(v, dict) and over:
                    _check_reference(v, f"{at}: {side}")
                elif isinstance(v, bool) or not isinstance(v, (int, float, str)) or (
                        over and isinstance(v, str)):
                    kinds = "numbers or {rows, over} mappings" if over else \
                        "numbers or column names"
                    raise InputError(f"{at}: {side} takes {kinds}, got {v!r}")
            bounds[side] = values
        out.append({"what": c["what"], "rows": c.get("rows"), "value": c["value"],
                    **bounds, "holds": c.get("holds", "all"), "over": over})
    return out


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
        One dict per check: ``what``, ``status`` ("yes", "no", or "no data" when its rows or
        columns are missing), ``measured`` ({panel: value}, the first ``SHOWN`` rows
        selected, or a summary of them), ``passed`` / ``rows`` (counts).
    """
    out = []
    for c in criteria:
        rows = df
        if c["rows"]:
            try:
                rows = df.query(c["rows"], engine="python")
            except Exception as e:  # noqa: BLE001 - a query on columns this figure lacks
                out.append({**_head(c), "status": "no data", "note": f"rows: {e}"})
                continue
        lacking = [b for b in [c["value"], *c["above"], *c["below"]]
                   if isinstance(b, str) and b not in rows]
        if lacking or rows.empty:
            note = f"no column {lacking[0]}" if lacking else "no rows"
            out.append({**_head(c), "status": "no data", "note": note})
            continue
        value = pd.to_numeric(rows[c["value"]], errors="coerce")
        if c["over"]:
            if value.dropna().empty:
                out.append({**_head(c), "status": "no data", "note": "no numbers"})
                continue
            got = float(OVER[c["over"]](value.dropna()))
            above = [_reference(df, b, c["value"]) if isinstance(b, dict) else float(b)
                     for b in c["above"]]
            below = [_reference(df, b, c["value"]) if isinstance(b, dict) else float(b)
                     for b in c["below"]]
            if any(math.isnan(b) for b in above + below):
                out.append({**_head(c), "status": "no data", "note": "no rows for a bound"})
                continue
            held = all(got > b for b in above) and all(got < b for b in below)
            measured = {c["over"]: _num(got), "n": int(value.notna().sum())}
            measured |= {f"bound {i + 1}": _num(b) for i, b in enumerate(above + below)
                         if len(above + below) and any(isinstance(x, dict)
                                                       for x in c["above"] + c["below"])}
            out.append({**_head(c), "status": "yes" if held else "no", "passed": int(held),
                        "rows": int(len(rows)), "measured": measured})
            continue
        ok = value.notna()
        for b in c["above"]:
            bound = _bound(rows, b)
            ok &= bound.notna() & (value > bound)
        for b in c["below"]:
            bound = _bound(rows, b)
            ok &= bound.notna() & (value < bound)
        held = bool(ok.any()) if c["holds"] == "any" else bool(ok.all())
        out.append({**_head(c), "status": "yes" if held else "no", "passed": int(ok.sum()),
                    "rows": int(len(rows)), "measured": _measured(rows, value)})
    return out


def _head(c: dict) -> dict:
    return {"what": c["what"], "value": c["value"], "above": c["above"], "below": c["below"],
            "holds": c["holds"], "over": c["over"]}


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


def reproduced(checks: list[dict]) -> str:
    """``yes`` (every check held), ``partly``, ``no`` (none did) or ``untested`` (none ran)."""
    ran = [c for c in checks if c["status"] in ("yes", "no")]
    if not ran:
        return "untested"
    held = sum(c["status"] == "yes" for c in ran)
    if held == len(checks):
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
        for g in gates(metrics):
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
    held = sum(c["status"] == "yes" for c in checks)
    failed = sorted({g["gate"] for g in gate_rows if g["status"] != "pass"})
    gates_text = ("every gate passed" if not failed else
                  "gates not passed: " + ", ".join(failed) + " (the shape is not evidence)")
    return f"Reproduced in shape: {status} ({held} of {len(checks)} checks); {gates_text}."


# ------------------------------------------------------------- the table of all figures

BEGIN, END = "<!-- in-shape table: begin -->", "<!-- in-shape table: end -->"
TABLE_HEAD = ("figure", "variant", "published result", "our numbers", "reproduced", "gates",
              "why not")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _numbers(checks: list[dict]) -> str:
    parts = []
    for c in checks:
        got = c.get("measured") or {}
        shown = ", ".join(f"{k} {v}" for k, v in list(got.items())[:4])
        parts.append(f"{c['what']} → {c['status']}" + (f" ({shown})" if shown else ""))
    return "; ".join(parts) or "no checks"


def _next_run(meta: dict, sweeps: list[str]) -> str:
    """What to run when ``sweeps`` failed a gate: under cpu-paper's written rule (its steps
    double once, ``train.config``), the doubling while it is unspent, else the paper profile."""
    configs = meta.get("configs") or {}
    doubled = []
    for sweep in sweeps:
        cfg = configs.get(sweep) or {}
        if cfg.get("profile") != "cpu-paper" or not isinstance(cfg.get("steps"), int):
            return "train longer"
        if cfg["steps"] < 2 * PROFILES["cpu-paper"]["steps"]:
            return f"train longer: cpu-paper's rule doubles {sweep}'s {cfg['steps']} steps once"
        doubled.append(f"{sweep} {cfg['steps']}")
    return ("cpu-paper's one doubling is spent (steps: " + ", ".join(doubled)
            + "): the gpu variant (paper profile) is what to run next")


def _why_not(meta: dict) -> str:
    if meta.get("reproduced") == "yes":
        return ""
    rows = [g for g in meta.get("gates", []) if g["status"] != "pass"]
    if rows:
        values = "; ".join(("{}: ".format(g["sweep"]) if g.get("sweep") else "")
                           + f"{g['gate']} {g.get('value')}, threshold {g.get('threshold')}"
                           for g in rows)
        sweeps = sorted({g.get("sweep", "") for g in rows})
        failed = ", ".join(sorted({g["gate"] for g in rows}))
        return f"inconclusive: its runs did not pass {failed} ({values}); {_next_run(meta, sweeps)}"
    missed = [c["what"] for c in meta.get("in_shape", []) if c["status"] != "yes"]
    return ("a finding: the runs passed their gates and " + "; ".join(missed) + " did not hold"
            if missed else "no checks declared")


def shape_table(metas: dict[str, dict]) -> str:
    """The markdown table of figures: published result, our numbers, reproduced, gates, why not.

    Args:
        metas: {figure name: its ``<name>.json``}.
    """
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    for name, meta in sorted(metas.items()):
        gate_rows = meta.get("gates", [])
        passed = sum(g["status"] == "pass" for g in gate_rows)
        row = (f"`{name}`", meta.get("variant", ""), meta.get("result", ""),
               _numbers(meta.get("in_shape", [])), f"**{meta.get('reproduced', 'untested')}**",
               f"{passed} of {len(gate_rows)} pass", _why_not(meta))
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def write_shape_table(out: str | Path) -> Path:
    """Put ``shape_table`` of every figure JSON in ``out`` into ``out/README.md``, between its
    markers (the rest of the file kept; the file made when missing), atomically."""
    out = Path(out)
    metas = {}
    for f in sorted(out.glob("*.json")):
        try:
            meta = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(meta, dict) and meta.get("format") == "rankscope.figure/1":
            metas[f.stem] = meta
    readme = out / "README.md"
    text = readme.read_text() if readme.is_file() else "# Figures\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)].rstrip("\n") + text[text.index(END) + len(END):]
    body = ("## Reproduced or not\n\nEach figure's `in_shape` checks (its experiment YAML, "
            "written before its runs were read) on the data it draws, and the training gates "
            "of those runs. Made by `rankscope figures`.\n\n" + shape_table(metas))
    atomic_write_text(readme, text.rstrip("\n") + f"\n\n{BEGIN}\n{body}\n{END}\n")
    return readme
