"""The table of every figure: published result, our numbers, reproduced or not, gates, why not.

Made from the figures' caption JSON files (``pipeline.figures`` writes one beside each PNG)
into ``figures/README.md``, between its markers, by ``rankscope figures``.
"""
from __future__ import annotations

import json
from pathlib import Path

from rankscope.outputs.in_shape import SHOWN, failed_gate_rows
from rankscope.store.atomic import atomic_write_text
from rankscope.train.config import PROFILES


BEGIN, END = "<!-- in-shape table: begin -->", "<!-- in-shape table: end -->"
TABLE_HEAD = ("figure", "variant", "published result", "our numbers", "reproduced", "gates",
              "why not")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _numbers(checks: list[dict]) -> str:
    parts = []
    for c in checks:
        got = c.get("measured") or {}
        shown = ", ".join(f"{k} {v}" for k, v in list(got.items())[:SHOWN])
        label = ("sanity, not evidence: " if c.get("sanity") else "") + c["what"]
        parts.append(f"{label} → {c['status']}" + (f" ({shown})" if shown else ""))
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
    checks = meta.get("in_shape", [])
    insane = [c["what"] for c in checks if c.get("sanity") and c["status"] != "yes"]
    sanity = ("; a sanity check did not hold (the pipeline, not the paper): " + "; ".join(insane)
              if insane else "")
    if meta.get("reproduced") == "yes":
        return sanity.removeprefix("; ")
    rows = failed_gate_rows(meta.get("gates", []))
    if rows:
        values = "; ".join(("{}: ".format(g["sweep"]) if g.get("sweep") else "")
                           + f"{g['gate']} {g.get('value')}, threshold {g.get('threshold')}"
                           for g in rows)
        sweeps = sorted({g.get("sweep", "") for g in rows})
        failed = ", ".join(sorted({g["gate"] for g in rows}))
        return (f"inconclusive: its runs did not pass {failed} ({values}); "
                f"{_next_run(meta, sweeps)}{sanity}")
    evidence = [c for c in checks if not c.get("sanity")]
    missed = [c["what"] for c in evidence if c["status"] == "no"]
    unread = [f"{c['what']} ({c.get('note', 'no data')})" for c in evidence
              if c["status"] not in ("yes", "no")]
    parts = (["a finding: the runs passed their gates and " + "; ".join(missed) + " did not hold"]
             if missed else []) + (["not read: " + "; ".join(unread)] if unread else [])
    return ("; ".join(parts) if parts else "no checks declared") + sanity


def shape_table(metas: dict[str, dict]) -> str:
    """The markdown table of figures: published result, our numbers, reproduced, gates, why not.

    Args:
        metas: {figure name: its ``<name>.json``}.
    """
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    for name, meta in sorted(metas.items()):
        gate_rows = meta.get("gates", [])
        passed = sum(g["status"] == "pass" for g in gate_rows)
        skipped = sum(g["status"] == "skipped" for g in gate_rows)
        gates_cell = f"{passed} of {len(gate_rows) - skipped} pass" + (
            f" ({skipped} skipped)" if skipped else "")
        row = (f"`{name}`", meta.get("variant", ""), meta.get("result", ""),
               _numbers(meta.get("in_shape", [])), f"**{meta.get('reproduced', 'untested')}**",
               gates_cell, _why_not(meta))
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
