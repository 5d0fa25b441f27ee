"""Time ``rankscope compare`` (every analysis but the truncation test) on a real SmolLM2 sweep.

Run: python benchmarks/compare.py [--runs DIR] [--repeats 1] [--threads N] [--old-rev REV]
                                  [--no-old] [--no-write]

The sweep: SmolLM2-135M on news, full fine-tuning and LoRA r ∈ {1, 2, 4, 8, 16, 64} × seeds
{0, 1, 2} on q_proj and v_proj of all 30 layers (21 runs). Training length does not change
the analysis' cost, so each run is one optimizer step of one 32-token sequence; the folder is
built once under ``--runs`` (default /tmp/rankscope-bench/compare-sweep) and reused.

Both paths are timed end to end in this one process, interleaved, each writing its tables
and verdict into a fresh temporary folder: "new" is this checkout's ``rankscope.analysis.compare``;
"old" is ``rankscope/compare.py`` as of ``--old-rev`` (before each decomposition was done
once), loaded beside today's modules, whose old entry points it still calls. Alongside the
seconds: the number of large SVDs each path ran (torch.linalg.svd / svdvals calls on
matrices with both sides ≥ 100, counted on a separate untimed pass), and the largest
difference between the tables the two paths share. Target: new < 60 s on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))   # this checkout's rankscope, whatever else is installed
RESULTS = HERE / "RESULTS.md"

from _results import write_section  # noqa: E402  (benchmarks/, beside this script)

OLD_REV = "ab081b9"     # the last revision whose compare decomposed updates several times
SWEEP = dict(model="smollm2-135m", task="news", methods=("full", "lora"),
             ranks=(1, 2, 4, 8, 16, 64), seeds=(0, 1, 2), targets=("q_proj", "v_proj"),
             steps=1, batch_size=1, max_len=32, max_eval_examples=2, checkpoint_every=1)
TARGET_S = 60.0


def machine_heading() -> str:
    """One line naming the machine, the software and the date the numbers were taken on."""
    return (f"{platform.processor() or platform.machine()}, {platform.platform()}, "
            f"{os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"torch {torch.__version__}, {dt.date.today().isoformat()}, load average "
            f"{os.getloadavg()[0]:.1f} at the end (other jobs on the machine)")


def ensure_sweep(runs: Path) -> Path:
    """The 21-run sweep under ``runs``, trained first if any run is missing (minutes, once)."""
    from rankscope.train.config import build_sweep
    from rankscope.train.sweep import run_sweep

    cfg = build_sweep(overrides=dict(SWEEP))
    run_sweep(cfg, runs, progress=False, log=lambda s: print(s, file=sys.stderr))
    return runs


def old_compare(rev: str):
    """``rankscope.analysis.compare`` as of ``rev``, imported as ``rankscope._compare_old``."""
    source = subprocess.run(["git", "show", f"{rev}:rankscope/compare.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="rankscope-old-")) / "_compare_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("rankscope._compare_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def timed(compare, runs: Path) -> tuple[float, float, dict[str, pd.DataFrame]]:
    """Wall and CPU seconds of one ``compare(runs, fresh_out)``, and its tables."""
    with tempfile.TemporaryDirectory(prefix="rankscope-bench-") as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        frames = compare(runs, Path(tmp) / "results", progress=False)
        return time.perf_counter() - t0, time.process_time() - c0, frames


def count_svds(compare, runs: Path) -> dict[str, int]:
    """Large SVD calls (both sides ≥ 100) of one untimed ``compare`` run, by kind."""
    counts = {"svd": 0, "svdvals": 0}
    real = {k: getattr(torch.linalg, k) for k in counts}

    def counting(kind):
        def f(x, *a, **kw):
            counts[kind] += min(x.shape[-2:]) >= 100
            return real[kind](x, *a, **kw)
        return f

    try:
        for kind in counts:
            setattr(torch.linalg, kind, counting(kind))
        timed(compare, runs)
    finally:
        for kind, fn in real.items():
            setattr(torch.linalg, kind, fn)
    return counts


SHARED = {  # table: (key columns, value columns) both paths compute alike
    "spectra": (["run", "name", "index"], ["sigma"]),
    "modules": (["run", "name"], ["fro_norm", "stable_rank", "energy_rank_90", "numerical_rank"]),
    "relation": (["run", "name", "r_dirs"], ["delta_dirs", "w_dirs", "random_dirs",
                                             "amplification"]),
    "intruders": (["run", "name", "eps"], ["count"]),
    "convergence": (["run", "name"], ["rel_dist", "phi_full_right", "phi_next_right",
                                      "energy_share"]),
}


def differences(old: dict, new: dict) -> dict[str, float]:
    """Largest |old − new| per shared table (intruders: number of differing counts);
    subspace: the rows against full fine-tuning, the only ones still in ΔW's basis."""
    out = {}
    for table, (keys, cols) in SHARED.items():
        a = old[table].sort_values(keys, ignore_index=True)
        b = new[table].sort_values(keys, ignore_index=True)
        diff = (a[cols].astype(float) - b[cols].astype(float)).abs().to_numpy()
        out[table] = float(np.count_nonzero(diff)) if table == "intruders" else float(np.nanmax(diff))
    keys = ["run_1", "run_2", "name", "side", "i"]
    a = old["subspace"].query("pair == 'full'").sort_values(keys, ignore_index=True)
    b = new["subspace"].query("pair == 'full'").sort_values(keys, ignore_index=True)
    out["subspace (vs full)"] = float((a["phi"] - b["phi"]).abs().max())
    return out


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("/tmp/rankscope-bench/compare-sweep"))
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats (minimum kept)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--old-rev", default=OLD_REV, help="git revision of the old compare.py")
    parser.add_argument("--no-old", action="store_true", help="time only the new path")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from rankscope.analysis.compare import compare as new

    runs = ensure_sweep(args.runs)
    paths = {"new": new} if args.no_old else {"old": old_compare(args.old_rev).compare, "new": new}
    seconds, cpu = {k: [] for k in paths}, {k: [] for k in paths}
    frames = {}
    for _ in range(args.repeats):
        for label, fn in paths.items():
            s, c, frames[label] = timed(fn, runs)
            seconds[label].append(s)
            cpu[label].append(c)
            print(f"{label}: {s:.1f} s wall, {c:.1f} s CPU", file=sys.stderr)
    rows = []
    for label, fn in paths.items():
        svds = count_svds(fn, runs)
        best = min(seconds[label])
        rows.append({"path": label, "seconds": round(best, 1),
                     "all_seconds": " ".join(f"{s:.1f}" for s in seconds[label]),
                     "cpu_seconds": round(min(cpu[label]), 1),
                     "dense_svd": svds["svd"], "dense_svdvals": svds["svdvals"],
                     "target": f"< {TARGET_S:.0f} s" if label == "new" else "",
                     "met": ("yes" if best < TARGET_S else "no") if label == "new" else ""})
    table = pd.DataFrame(rows)
    if "old" in paths:
        table["speedup"] = ["", f"{min(seconds['old']) / min(seconds['new']):.1f}x"]
    diffs = differences(frames["old"], frames["new"]) if "old" in paths else {}
    heading = machine_heading()
    print(f"## benchmarks/compare.py — {heading}\n\n{render(table)}\n\n{render_diffs(diffs)}")
    if not args.no_write:
        command = "python benchmarks/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results(table, diffs, heading, command.strip())
    return table


def render(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def render_diffs(diffs: dict[str, float]) -> str:
    if not diffs:
        return ""
    return ("Largest difference old vs new, tables both compute alike: " +
            "; ".join(f"{k} {v:.3g}" + (" counts differ" if k == "intruders" else "")
                      for k, v in diffs.items()) + ".")


def write_results(table: pd.DataFrame, diffs: dict, heading: str, command: str) -> None:
    """Put this script's section into RESULTS.md, replacing its previous one, keeping the rest."""
    section = (f"## benchmarks/compare.py — {heading}\n\n"
               f"`{command}`. Wall seconds of `rankscope.analysis.compare(sweep, out)` (every analysis "
               "but the truncation test: spectra, subspace similarity and grids, convergence, "
               "ΔW vs W, intruders, verdict) on the 21-run SmolLM2-135M sweep (full + LoRA "
               "r ∈ {1, 2, 4, 8, 16, 64} × seeds {0, 1, 2}, q_proj and v_proj on all 30 "
               "layers); wall seconds, minimum over interleaved repeats (all of them in "
               "all_seconds), and the minimum CPU seconds of the process over the repeats. old: "
               f"`rankscope/compare.py` at {OLD_REV}; new: this revision. dense_svd / "
               "dense_svdvals: large SVD calls (both sides ≥ 100) in one run of each.\n\n"
               f"{render(table)}\n\n{render_diffs(diffs)}\n")
    write_section(RESULTS, "compare.py", section)


if __name__ == "__main__":
    main()
