"""Top-K singular values against the dense SVD, side by side: time and energy-rank agreement.

Run: python benchmarks/svd_topk.py [--k 256] [--threads 1] [--no-write]

1. Where ``--svd auto`` switches: dense ``torch.linalg.svdvals`` vs ``topk_svdvals(x, K)`` on
   square Gaussian-spectrum matrices of growing side; the smallest side where top-K is ≥ 2×
   faster is the one ``topk.AUTO_TOPK_ABOVE`` should sit below.
2. At 4096 × 4096 and 4096 × 14336 (a 7B model's attention and MLP shapes), three spectra:
   a rank-16 update under a flat noise floor holding 5% of the energy (as fine-tuning updates look), a power law
   σ_i ∝ 1/i, and a slow σ_i ∝ 1/√i whose k₉₀ lies beyond K. Each row gives the time ratio,
   the largest relative error of the top K values, and k₅₀/k₉₀/k₉₉ from both (top-K says
   "> K" where its values do not reach the share).
Timings are the minimum of ``--repeats`` runs, on ``--threads`` threads (1 by default: a busy
machine stalls LAPACK's threads at every barrier).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from _results import write_section  # benchmarks/, beside this script
from rankscope.linalg.spectra import rank_at_energy
from rankscope.linalg.topk import topk_svdvals
from rankscope.store.provenance import machine_heading

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def with_spectrum(s: torch.Tensor, d_out: int, d_in: int, gen: torch.Generator) -> torch.Tensor:
    """U diag(s) Vᵀ (d_out, d_in) in float32, U and V random with orthonormal columns."""
    m = s.numel()
    u, _ = torch.linalg.qr(torch.randn(d_out, m, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d_in, m, generator=gen))
    return (u * s) @ v.T


def spectra(m: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, m + 1, dtype=torch.float32)
    head = torch.logspace(0, -2, 16)
    tail = (0.05 / 0.95 * float(head.square().sum()) / (m - 16)) ** 0.5   # a flat 5% of the energy
    return {"rank 16 + noise": torch.cat([head, torch.full((m - 16,), tail)]),
            "σ ∝ 1/i": 1 / i, "σ ∝ 1/√i": i ** -0.5}


def _ranks(s: torch.Tensor, fro: float | None) -> list[str]:
    out = []
    for tau in (0.5, 0.9, 0.99):
        k = rank_at_energy(s, tau, fro=fro)
        out.append(f"> {s.numel()}" if k is None else str(k))
    return out


def threshold_rows(k: int, repeats: int, sides=(512, 1024, 2048, 3072, 4096)) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for side in sides:
        x = torch.randn(side, side, generator=gen) / side ** 0.5
        t_dense, _ = _best(lambda: torch.linalg.svdvals(x), repeats)
        t_top, _ = _best(lambda: topk_svdvals(x, min(k, side)), repeats)
        rows.append({"part": "switch", "case": f"{side}×{side}, K={min(k, side)}",
                     "dense_s": t_dense, "topk_s": t_top, "speed-up": t_dense / t_top,
                     "max rel err": "", "k50/k90/k99 dense": "", "k50/k90/k99 top-K": ""})
    return rows


def agreement_rows(k: int, repeats: int, shapes=((4096, 4096), (4096, 14336))) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    rows = []
    for d_out, d_in in shapes:
        for name, s in spectra(min(d_out, d_in)).items():
            x = with_spectrum(s, d_out, d_in, gen)
            fro = float(torch.linalg.vector_norm(x.double()))
            t_dense, dense = _best(lambda: torch.linalg.svdvals(x), 1)
            t_top, top = _best(lambda: topk_svdvals(x, k), repeats)
            err = float(((dense[:k] - top) / dense[:k]).abs().max())
            rows.append({"part": "agreement", "case": f"{d_out}×{d_in} {name}, K={k}",
                         "dense_s": t_dense, "topk_s": t_top, "speed-up": t_dense / t_top,
                         "max rel err": f"{err:.1e}",
                         "k50/k90/k99 dense": " / ".join(_ranks(dense, None)),
                         "k50/k90/k99 top-K": " / ".join(_ranks(top, fro))})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def render(table: pd.DataFrame) -> str:
    shown = table.copy()
    for col in ("dense_s", "topk_s"):
        shown[col] = shown[col].map(lambda v: f"{v:.3g}")
    shown["speed-up"] = shown["speed-up"].map(lambda v: f"{v:.1f}×")
    cols = list(shown.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.values]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=256, help="K of the top-K SVD")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heading = machine_heading()
    table = pd.DataFrame(threshold_rows(args.k, args.repeats) + agreement_rows(args.k, args.repeats))
    print(heading)
    print(render(table))
    if not args.no_write:
        command = " ".join(["python benchmarks/svd_topk.py", *(argv or sys.argv[1:])])
        write_section(RESULTS, "svd_topk.py", (
            f"## benchmarks/svd_topk.py — {heading}\n\n`{command}` on {args.threads} thread(s). "
            "dense_s: `torch.linalg.svdvals` of the float32 matrix; topk_s: "
            "`rankscope.linalg.topk.topk_svdvals` (randomized, 6 subspace iterations, K + 32 "
            "columns). Energy ranks from the top K use the exact ‖X‖_F.\n\n" + render(table)))
    return table


if __name__ == "__main__":
    main()
