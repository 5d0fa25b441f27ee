"""Decompose every update of a sweep once, so that each analysis reuses the same SVDs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .deltas import DeltaSet, ModuleDelta, from_runs
from .errors import InputError
from .spectra import dense_svd, factorized_svd, svd_device


@dataclass(frozen=True)
class Decomp:
    """The thin SVD of one module's ΔW (top ``keep`` triplets for dense updates)."""

    name: str
    layer: int | None
    module: str
    d_out: int
    d_in: int
    U: torch.Tensor          # (d_out, m) left singular vectors, float64
    S: torch.Tensor          # (m,) descending
    Vh: torch.Tensor         # (m, d_in)
    fro: float               # ‖ΔW‖_F over the whole spectrum, not only the kept part
    delta: ModuleDelta = field(repr=False)

    def dense(self) -> torch.Tensor:
        """ΔW (d_out, d_in) in float64."""
        return self.delta.materialize(torch.float64)


@dataclass(frozen=True)
class RunDecomp:
    """One run's identifiers, manifest and per-module decompositions."""

    run: str
    method: str
    rank: int | None
    seed: int | None
    manifest: dict
    modules: dict[str, Decomp]


def decompose(delta: ModuleDelta, *, keep: int | None = None) -> Decomp:
    """SVD of one update: factorized for LoRA (exact), dense float32→float64 otherwise."""
    if delta.factored:
        U, S, Vh = factorized_svd(delta.B, delta.A, scale=delta.scale, dtype=torch.float64)
    else:
        U, S, Vh = dense_svd(delta.dense, dtype=torch.float32, device=svd_device("auto"))
        U, S, Vh = U.double(), S.double(), Vh.double()
    fro = float(torch.linalg.vector_norm(S))
    if keep is not None:
        U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    return Decomp(delta.name, delta.layer, delta.module, delta.d_out, delta.d_in, U, S, Vh, fro,
                  delta)


def decompose_sweep(path: str | Path, *, keep: int | None = None,
                    names: set[str] | None = None) -> list[RunDecomp]:
    """Decompose every finished run under ``path``, on the modules LoRA adapted.

    Full runs hold every linear module; only those some LoRA run also adapted are kept (all
    of them when the sweep has no LoRA run, or ``names`` when given).

    Raises:
        InputError: no finished runs, or runs of different models or tasks mixed together.
    """
    sets = from_runs(path)
    check_same_setup(sets)
    lora_names = names
    if lora_names is None:
        lora = [s for s in sets if s.method == "lora"]
        if lora:
            lora_names = {d.name for d in lora[0]}
    out = []
    for s in sets:
        mods = {}
        for d in s:
            if lora_names is None or d.name in lora_names:
                mods[d.name] = decompose(d, keep=keep if s.method == "full" else None)
        out.append(RunDecomp(s.run, s.method, s.rank, s.seed, s.meta, mods))
    return out


def check_same_setup(sets: list[DeltaSet]) -> None:
    """All runs must come from one model and one dataset, else comparisons mean nothing.

    Raises:
        InputError: naming the two runs that differ and how.
    """
    first = sets[0]
    for s in sets[1:]:
        for key in ("model", "task", "data_hash", "split_hash"):
            if s.meta.get(key) != first.meta.get(key):
                raise InputError(f"runs {first.run} and {s.run} differ in {key} "
                                 f"({first.meta.get(key)} vs {s.meta.get(key)}): mixed sweeps")
