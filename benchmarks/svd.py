"""SVD costs of ``rankscope analyze``, side by side, in one table (and in benchmarks/RESULTS.md).

Run: python benchmarks/svd.py [--repeats 3] [--threads N] [--skip-factorized] [--no-write]

Two comparisons, each a ratio measured in this one run:
  1. factorized vs dense singular values of a LoRA ΔW = s·B·A (shapes 576² … 11008×4096,
     r ∈ {8, 64}); the rows come from ``benchmarks/svd_factorized.py``. Target: ≥ 100× at 4096.
  2. the whole-model analysis of a full SmolLM2-135M ΔW (a run folder holding a dense,
     seeded low-rank-plus-noise update for each of its 210 linear modules): end-to-end
     ``rankscope.analyze(run_dir, progress=False)`` (reading the file, checks, SVDs, metrics,
     the tidy frames) against the bare loop of ``torch.linalg.svdvals`` over the same 210
     float32 matrices already in memory. Target: ≤ 20% overhead.
Timings are the minimum over ``--repeats`` interleaved repeats (robust to a busy machine).
On a machine shared with other jobs, ``--threads 1`` avoids LAPACK's multi-threaded SVD stalling
at every barrier on a descheduled thread (seen here: 0.3 s with 1 thread, 11 s with 2).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from _results import write_section  # benchmarks/, beside this script
from rankscope.store.provenance import machine_heading

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
COLUMNS = ["comparison", "case", "rankscope_ms", "baseline_ms", "ratio", "target", "met"]


# ----------------------------------------------------- 1. factorized vs dense (reused)

def factorized_rows() -> list[dict]:
    """The rows of ``svd_factorized.factorized_vs_dense_table``, in this table's columns."""
    spec = importlib.util.spec_from_file_location("svd_factorized", HERE / "svd_factorized.py")
    if spec is None or not (HERE / "svd_factorized.py").is_file():
        print("benchmarks/svd_factorized.py is missing: part 1 skipped", file=sys.stderr)
        return []
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = []
    for row in module.factorized_vs_dense_table().to_dict("records"):
        at_4096 = row["d_in"] == 4096 and row["d_out"] == 4096
        speedup = row["dense/fact_f64"]
        rows.append({"comparison": "factorized f64 vs dense f32 svdvals",
                     "case": f"{row['d_out']}x{row['d_in']} r={row['r']}",
                     "rankscope_ms": row["factorized_f64_ms"], "baseline_ms": row["dense_f32_ms"],
                     "ratio": f"{speedup:.0f}x faster",
                     "target": ">= 100x" if at_4096 else "",
                     "met": ("yes" if speedup >= 100 else "NO") if at_4096 else ""})
    return rows


# ------------------------------------------------- 2. whole-model analysis vs bare SVDs

def smollm2_shapes() -> list[tuple[str, int, int]]:
    """(name, d_out, d_in) of SmolLM2-135M's 210 linear modules, as the trained model names them."""
    from rankscope.train.models import find_linear_modules, load_backbone

    return [(f"model.{i.name}", i.d_out, i.d_in)
            for i in find_linear_modules(load_backbone("smollm2-135m"))]


def realistic_update(d_out: int, d_in: int, gen: torch.Generator, *, rank: int = 16,
                     noise: float = 1e-3) -> torch.Tensor:
    """A dense ΔW (d_out, d_in): a rank-16 part with decaying spectrum plus small full-rank noise."""
    decay = torch.logspace(0, -2, rank)                                   # (rank,)
    low = (torch.randn(d_out, rank, generator=gen) * decay) @ torch.randn(rank, d_in, generator=gen)
    return low / d_in**0.5 + noise * torch.randn(d_out, d_in, generator=gen)


def write_full_run(run_dir: Path, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A finished full-method run folder for SmolLM2; returns its 210 updates (float32)."""
    from rankscope.store.runs import UPDATES, write_manifest, write_updates

    gen = torch.Generator().manual_seed(seed)
    updates = {f"{name}.delta": realistic_update(d_out, d_in, gen)
               for name, d_out, d_in in smollm2_shapes()}
    write_updates(run_dir / UPDATES, updates, method="full")
    write_manifest(run_dir, {"method": "full", "rank": None, "seed": seed, "model": "smollm2-135m",
                             "n_modules": len(updates), "note": "benchmarks/svd.py synthetic ΔW"})
    return updates


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(); CPU time (user + sys of this process) ignores other jobs."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def whole_model_rows(repeats: int) -> list[dict]:
    """analyze(run) end to end vs the bare svdvals loop, minimum of interleaved repeats.

    Two rows: wall-clock and CPU time. On a machine busy with other jobs the wall-clock ratio
    swings by ±10%; the CPU-time ratio (with one thread, where no thread spins on another)
    measures the work alone.
    """
    import rankscope

    with tempfile.TemporaryDirectory(prefix="rankscope-bench-") as tmp:
        run_dir = Path(tmp) / "full-s0"
        run_dir.mkdir()
        mats = list(write_full_run(run_dir).values())                     # 210 × (d_out, d_in)

        def bare():
            for m in mats:
                torch.linalg.svdvals(m)

        def end_to_end():
            assert len(rankscope.analyze(run_dir, progress=False)[1]) == len(mats) == 210

        end_to_end()                                                      # warm-up: imports, cache
        times = [(_timed(bare), _timed(end_to_end)) for _ in range(repeats)]
    rows = []
    for clock, k in (("wall", 0), ("CPU", 1)):
        t_bare = min(b[k] for b, _ in times)
        t_all = min(a[k] for _, a in times)
        overhead = t_all / t_bare - 1
        rows.append({"comparison": f"analyze(run) end to end vs bare svdvals loop ({clock} time)",
                     "case": f"SmolLM2-135M full ΔW, {len(mats)} modules",
                     "rankscope_ms": 1e3 * t_all, "baseline_ms": 1e3 * t_bare,
                     "ratio": f"{t_all / t_bare:.3f} ({100 * overhead:+.1f}% overhead)",
                     "target": "<= 20% overhead", "met": "yes" if overhead <= 0.20 else "NO"})
    return rows


# ---------------------------------------------------------------------------- output

def render(table: pd.DataFrame) -> str:
    """The table as GitHub markdown, times in ms to 3 significant digits."""
    shown = table.copy()
    for col in ("rankscope_ms", "baseline_ms"):
        shown[col] = shown[col].map(lambda v: f"{v:.3g}")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown[COLUMNS].values]
    return "\n".join(lines)


def write_results(table: pd.DataFrame, heading: str, command: str) -> None:
    """Put this script's section into RESULTS.md, replacing its previous one, keeping the rest."""
    section = (f"## benchmarks/svd.py — {heading}\n\n"
               f"`{command}`. The factorized rows are medians (from `svd_factorized.py`): "
               "rankscope_ms the factorized float64 SVD, baseline_ms the dense float32 "
               "`torch.linalg.svdvals` of the materialised ΔW. The last rows are minima over "
               "interleaved repeats: rankscope_ms the whole `rankscope.analyze(run_dir)` call, "
               "baseline_ms the bare `torch.linalg.svdvals` loop over the same 210 matrices in "
               "memory.\n\n"
               f"{render(table)}\n")
    write_section(RESULTS, "svd.py", section)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of part 2")
    parser.add_argument("--skip-factorized", action="store_true", help="only part 2")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    heading = machine_heading()
    rows = [] if args.skip_factorized else factorized_rows()
    rows += whole_model_rows(args.repeats)
    table = pd.DataFrame(rows, columns=COLUMNS)
    print(heading)
    print(render(table))
    if not args.no_write:
        write_results(table, heading, " ".join(["python benchmarks/svd.py", *(argv or sys.argv[1:])]))
    return table


if __name__ == "__main__":
    main()
