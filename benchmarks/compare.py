"""Time every analysis of ``rankscope compare`` on a real SmolLM2 sweep, and its two intruder paths
side by side.

Run: python benchmarks/compare.py [--runs DIR] [--repeats 1] [--threads N]
                                  [--ranks 1,2,4,8,16,64] [--seeds 0,1,2] [--no-write]

The sweep: SmolLM2-135M on news, full fine-tuning and LoRA r ∈ {1, 2, 4, 8, 16, 64} × seeds
{0, 1, 2} on q_proj and v_proj of all 30 layers (21 runs; ``--ranks``/``--seeds`` shrink it for
a quick check). Training length does not change the analysis' cost, so each run is one
optimizer step of one 32-token sequence; the folder is built once under ``--runs`` (default
/tmp/rankscope-bench/compare-sweep) and reused.

Two measurements, each in this one process, on implementations that both live in this
checkout (no other revision is needed):
  1. ``rankscope.analysis.compare.compare_frames(sweep)`` end to end (every table of
     ``rankscope compare`` but the files it writes): wall and CPU seconds, minimum over
     ``--repeats``, and the large SVDs it runs (``torch.linalg.svd`` / ``svdvals`` calls on
     matrices with both sides ≥ 100, counted on a separate untimed pass). Target: < 60 s.
  2. ``analysis.relation.intruders`` on the same decomposed runs: the fast path (W_0 + ΔW's
     top-k vectors from W_0's SVD by Davidson for LoRA) against ``dense=True`` (a float32 SVD
     of every W_0 + ΔW): seconds, the ratio, and the number of intruder counts that differ.
     Target: none differ.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))   # this checkout's rankscope, whatever else is installed
RESULTS = HERE / "RESULTS.md"

from _results import write_section  # noqa: E402  (benchmarks/, beside this script)

from rankscope.store.provenance import machine_heading  # noqa: E402

SWEEP = dict(model="smollm2-135m", task="news", methods=("full", "lora"),
             ranks=(1, 2, 4, 8, 16, 64), seeds=(0, 1, 2), targets=("q_proj", "v_proj"),
             steps=1, batch_size=1, max_len=32, max_eval_examples=2, checkpoint_every=1)
TARGET_S = 60.0
COLUMNS = ["comparison", "rankscope_s", "baseline_s", "ratio", "dense_svd", "dense_svdvals",
           "target", "met"]


def ensure_sweep(runs: Path, *, ranks: tuple[int, ...], seeds: tuple[int, ...]) -> Path:
    """The sweep under ``runs``, trained first if any run is missing (minutes, once)."""
    from rankscope.train.config import build_sweep
    from rankscope.train.sweep import run_sweep

    cfg = build_sweep(overrides={**SWEEP, "ranks": ranks, "seeds": seeds})
    run_sweep(cfg, runs, progress=False, log=lambda s: print(s, file=sys.stderr))
    return runs


def timed(fn) -> tuple[float, float, object]:
    """Wall and CPU seconds of fn() (CPU: user + sys of this process), and its result."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


@contextmanager
def counting_svds():
    """Count the large SVD calls (both sides ≥ 100) made inside the block, by kind."""
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
        yield counts
    finally:
        for kind, fn in real.items():
            setattr(torch.linalg, kind, fn)


def compare_rows(runs: Path, repeats: int) -> list[dict]:
    """compare_frames end to end: wall and CPU seconds (minimum over repeats), SVD counts."""
    from rankscope.analysis.compare import compare_frames

    times = [timed(lambda: compare_frames(runs))[:2] for _ in range(repeats)]
    with counting_svds() as svds:
        compare_frames(runs)
    rows = []
    for clock, k in (("wall", 0), ("CPU", 1)):
        best = min(t[k] for t in times)
        rows.append({"comparison": f"compare_frames end to end ({clock} seconds)",
                     "rankscope_s": round(best, 1), "dense_svd": svds["svd"],
                     "dense_svdvals": svds["svdvals"], "target": f"< {TARGET_S:.0f} s",
                     "met": "yes" if best < TARGET_S else "no"})
        print(f"compare_frames: {' '.join(f'{t[k]:.1f}' for t in times)} s {clock}",
              file=sys.stderr)
    return rows


def intruder_rows(runs: Path, repeats: int) -> list[dict]:
    """The fast intruder path against the dense one, on the same decompositions."""
    from rankscope.analysis.decompose import base_svds, base_weights, decompose_sweep
    from rankscope.analysis.relation import intruders

    decomposed = decompose_sweep(runs)
    weights = base_weights(decomposed)
    svds = base_svds(weights)
    out = {}
    for label, dense in (("fast", False), ("dense", True)):
        def run(dense=dense):
            return intruders(decomposed, weights, svds=svds, dense=dense)

        best = min(timed(run)[0] for _ in range(repeats))
        with counting_svds() as counts:
            table = run()
        out[label] = (best, dict(counts), table)
    (fast, fast_svds, a), (dense, _, b) = out["fast"], out["dense"]
    both = a.merge(b, on=["run", "name", "eps"], how="outer", suffixes=("_fast", "_dense"))
    differ = int((both["count_fast"] != both["count_dense"]).sum())   # a missing row differs too
    return [{"comparison": "intruders: Davidson from W_0's SVD vs dense SVD of W_0 + ΔW",
             "rankscope_s": round(fast, 2), "baseline_s": round(dense, 2),
             "ratio": f"{dense / fast:.1f}x faster", "dense_svd": fast_svds["svd"],
             "dense_svdvals": fast_svds["svdvals"],
             "target": "0 counts differ", "met": f"{'yes' if differ == 0 else 'no'} ({differ})"}]


def render(table: pd.DataFrame) -> str:
    """The table as GitHub markdown (empty cells for missing values)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |"
              for row in table[COLUMNS].itertuples(index=False)]
    return "\n".join(lines)


def write_results(table: pd.DataFrame, heading: str, command: str, n_runs: int) -> None:
    """Put this script's section into RESULTS.md, replacing its previous one, keeping the rest."""
    section = (f"## benchmarks/compare.py — {heading}\n\n"
               f"`{command}`, on a {n_runs}-run SmolLM2-135M sweep on news (q_proj and v_proj "
               "on all 30 layers; one training step each: training length does not change the "
               "analysis' cost). compare_frames: every table of `rankscope compare` (spectra and "
               "modules, φ and its grids, convergence, ΔW vs W, intruders), minimum over the "
               "repeats. intruders: both paths on the same decomposed runs. dense_svd / "
               "dense_svdvals: `torch.linalg.svd` / `svdvals` calls on matrices with both sides "
               "≥ 100 in one run of the rankscope path.\n\n"
               f"{render(table)}\n")
    write_section(RESULTS, "compare.py", section)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("/tmp/rankscope-bench/compare-sweep"))
    parser.add_argument("--repeats", type=int, default=1, help="repeats (minimum kept)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--ranks", type=_ints, default=SWEEP["ranks"], help="LoRA ranks, 1,2,…")
    parser.add_argument("--seeds", type=_ints, default=SWEEP["seeds"], help="seeds, 0,1,…")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = ensure_sweep(args.runs, ranks=args.ranks, seeds=args.seeds)
    table = pd.DataFrame(compare_rows(runs, args.repeats) + intruder_rows(runs, args.repeats),
                         columns=COLUMNS)
    heading = machine_heading()
    print(f"## benchmarks/compare.py — {heading}\n\n{render(table)}")
    if not args.no_write:
        command = "python benchmarks/compare.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
        n_runs = len(args.seeds) * (len(args.ranks) + 1)
        write_results(table, heading, command.strip(), n_runs)
    return table


if __name__ == "__main__":
    main()
