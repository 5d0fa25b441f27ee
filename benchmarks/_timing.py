"""What the end-to-end benchmarks (job.py, figures.py) share: runs grouped by kind, and the
rows of their stage and run-kind tables."""
from __future__ import annotations

import statistics
from collections import defaultdict


def run_kinds(manifests: list[dict], *, targets: bool = False) -> list[dict]:
    """Per run kind (full; LoRA by rank, and by adapted modules with ``targets``): runs, median
    tokens/s, median and summed wall seconds, whether they trained under bf16 autocast."""
    kinds: dict[tuple, list[dict]] = defaultdict(list)
    for m in manifests:
        mods = m["targets"] if isinstance(m["targets"], str) else ", ".join(m["targets"])
        kinds[(m["method"] != "full", mods if targets else "", m["method"], m["rank"] or 0)].append(m)
    return [{"kind": "full" if method == "full"
             else f"{method} r={rank}" + (f" ({mods})" if targets else ""),
             "runs": len(ms),
             "tokens_per_s": statistics.median(m["tokens_per_s"] for m in ms),
             "wall_s": statistics.median(m["wall_time_s"] for m in ms),
             "wall_s_sum": sum(m["wall_time_s"] for m in ms),
             "bf16": sorted({bool(m["bf16_autocast"]) for m in ms})}
            for (_, mods, method, rank), ms in sorted(kinds.items())]


def bf16_word(kinds: list[dict]) -> str:
    """yes / no / mixed: whether the runs trained under bf16 autocast (- for no runs)."""
    used = sorted({b for k in kinds for b in k["bf16"]})
    return {(True,): "yes", (False,): "no", (False, True): "mixed"}.get(tuple(used), "-")


def stage_rows(stages: list[tuple[str, float]], kinds: list[dict], total: float,
               rest: str) -> list[str]:
    """The stage table; the sweep's row is split into its runs' own time and ``rest``."""
    runs_s = sum(k["wall_s_sum"] for k in kinds)
    out = ["| stage | seconds | share |", "|---|---|---|"]
    for name, sec in stages:
        out.append(f"| {name} | {sec:.0f} | {sec / total:.1%} |")
        if name == "sweep":
            out.append(f"| … the runs (sum of their wall times) | {runs_s:.0f} | "
                       f"{runs_s / total:.1%} |")
            out.append(f"| … the rest: {rest} | {sec - runs_s:.0f} | {(sec - runs_s) / total:.1%} |")
    return out


def kind_rows(kinds: list[dict]) -> list[str]:
    """The run-kind table: runs, median tokens/s, median wall seconds per run."""
    return ["| run kind | runs | tokens/s (median) | wall s per run (median) |",
            "|---|---|---|---|"] + [
        f"| {k['kind']} | {k['runs']} | {k['tokens_per_s']:.0f} | {k['wall_s']:.0f} |"
        for k in kinds]
