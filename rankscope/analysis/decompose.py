"""The one SVD of an update ΔW, and every update of a sweep decomposed once with it, so that
each analysis reuses the same SVDs."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from rankscope.analysis.deltas import DeltaSet, ModuleDelta, check_same_setup, from_runs
from rankscope.errors import InputError
from rankscope.linalg.spectra import dense_svd, factorized_svd, factorized_svdvals, svd_device
from rankscope.linalg.topk import topk_svdvals
from rankscope.train.models import find_linear_modules, linear_weight, load_backbone, match_name

@dataclass(frozen=True)
class Decomp:
    """The thin SVD of one module's ΔW (its top ``keep`` triplets when ``decompose`` kept some)."""

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

    @cached_property
    def factor_frames(self) -> dict[str, torch.Tensor]:
        """Hu et al.'s basis for φ: {"left": B's left singular vectors (d_out, r), "right": A's
        right singular vectors as columns (d_in, r)}, float64, each ordered by its factor's own
        singular values. They span ΔW's column and row spaces (when B, A have rank r) but order
        the top-i directions differently from ΔW's singular vectors. With A₀ saved and A ≠ A₀,
        also "right_moved": the right singular vectors of A − A₀ (d_in, ≤ r), the part of the
        row space that training learned rather than drew at initialisation.

        Raises:
            InputError: a dense update, which has no factors.
        """
        if not self.delta.factored:
            raise InputError(f"{self.name}: a dense update has no LoRA factors A and B")
        u_b = torch.linalg.svd(self.delta.B.double(), full_matrices=False)[0]  # (d_out, r)
        v_a = torch.linalg.svd(self.delta.A.double().T, full_matrices=False)[0]  # (d_in, r)
        out = {"left": u_b, "right": v_a}
        if self.delta.A0 is not None:
            moved = (self.delta.A.double() - self.delta.A0.double()).T  # (d_in, r)
            v, s, _ = torch.linalg.svd(moved, full_matrices=False)
            keep = int((s > s[0] * max(moved.shape) * torch.finfo(torch.float64).eps).sum()) \
                if s[0] > 0 else 0
            if keep:
                out["right_moved"] = v[:, :keep]  # (d_in, rank of A − A₀)
        return out

    @property
    def a_moved(self) -> float | None:
        """‖A − A₀‖_F / ‖A₀‖_F, or None without A₀ (or for a dense update)."""
        d = self.delta
        if d.A0 is None or d.A is None:
            return None
        ref = float(torch.linalg.vector_norm(d.A0.double()))
        return float(torch.linalg.vector_norm(d.A.double() - d.A0.double())) / ref if ref else None


@dataclass(frozen=True)
class ModuleSpectrum:
    """The singular values of one module's ΔW, with the identifiers a spectra row carries."""

    name: str
    layer: int | None
    module: str
    rank: int | None         # the module's LoRA rank; None for a dense update
    d_out: int
    d_in: int
    S: torch.Tensor          # (m,) descending


@dataclass(frozen=True)
class RunDecomp:
    """One run's identifiers, manifest, per-module decompositions and (optionally) spectra."""

    run: str
    method: str
    rank: int | None
    seed: int | None
    manifest: dict
    modules: dict[str, Decomp]
    spectra: tuple[ModuleSpectrum, ...] = ()   # every module of the run, in file order


def update_svd(delta: ModuleDelta, *, compute_uv: bool = True, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None, topk: int | None = None):
    """The thin SVD of one update ΔW = U diag(S) Vh: the one place an update is decomposed.

    LoRA factors (ΔW = scale·B·A) take the exact factorized SVD in float64 (QR of B and Aᵀ,
    then the SVD of an r × r core: ``spectra.factorized_svd``); a dense ΔW takes
    ``spectra.dense_svd`` in ``dtype`` on ``device``, never in its storage dtype, or with
    ``topk`` only its top K singular values (``topk.topk_svdvals``, randomized).

    Args:
        delta: the module's update.
        compute_uv: False returns only S (cheaper: no singular vectors).
        dtype: float32 or float64 for a dense update (LoRA factors always use float64).
        device: where a dense SVD runs (None: where ΔW is); results come back on the CPU.
        topk: K, the top singular values of a dense update only (needs ``compute_uv`` False;
            LoRA factors are always decomposed exactly).

    Returns:
        (U (d_out, m), S (m,) descending, Vh (m, d_in)), or S alone; m = min(d_out, d_in) for
        a dense update (K with ``topk``), min(d_out, d_in, r) for LoRA.

    Raises:
        InputError: a dtype other than float32/float64, NaN/Inf, or factors that do not chain.
    """
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"SVD dtype must be float32 or float64, got {dtype}")
    if delta.factored:
        svd = factorized_svd if compute_uv else factorized_svdvals
        return svd(delta.B, delta.A, scale=delta.scale, dtype=torch.float64)
    if topk is not None:
        if compute_uv:
            raise InputError("a top-k SVD of an update gives its singular values only")
        return topk_svdvals(delta.dense.to(dtype), topk, device=device)
    return dense_svd(delta.dense, dtype=dtype, compute_uv=compute_uv, device=device)


def decompose(delta: ModuleDelta, *, keep: int | None = None,
              device: str | torch.device | None = "auto") -> Decomp:
    """One update's ``update_svd`` (dense: float32 on ``device``) as a float64 Decomp.

    ``fro`` is ‖ΔW‖_F over the whole spectrum; ``keep`` then keeps the top triplets only;
    ``device`` "auto" is CUDA when present (``spectra.svd_device``).
    """
    U, S, Vh = (t.double() for t in update_svd(delta, device=svd_device(device)))
    fro = float(torch.linalg.vector_norm(S))
    if keep is not None:
        U, S, Vh = U[:, :keep], S[:keep], Vh[:keep]
    return Decomp(delta.name, delta.layer, delta.module, delta.d_out, delta.d_in, U, S, Vh, fro,
                  delta)


def decompose_sweep(path: str | Path, *, keep: int | None = None, names: set[str] | None = None,
                    spectra: bool = False, device: str | None = "auto",
                    progress: bool = False) -> list[RunDecomp]:
    """Decompose every finished run under ``path``, on the modules LoRA adapted.

    Full runs hold every linear module; only those some LoRA run also adapted are decomposed
    (all of them when the sweep has no LoRA run, or ``names`` when given). With ``spectra``,
    every other module's singular values are computed too (``update_svd`` without vectors),
    so that each run's ``spectra`` lists every module once, and each ΔW is decomposed once.
    Dense SVDs run on ``device`` ("auto": CUDA when present, "cpu", "cuda").

    Raises:
        InputError: no finished runs, or runs of different setups mixed together.
    """
    sets = from_runs(path)
    check_same_setup(sets)
    lora_names = names
    if lora_names is None:
        lora = [s for s in sets if s.method == "lora"]
        if lora:
            lora_names = {d.name for d in lora[0]}
    from tqdm.auto import tqdm

    total = sum(s.n_modules or 0 for s in sets) or None
    with tqdm(total=total, desc="decompose", unit="module", disable=not progress,
              file=sys.stderr) as bar:
        return [_decompose_run(s, lora_names, keep=keep, spectra=spectra, device=device, bar=bar)
                for s in sets]


def _decompose_run(s: DeltaSet, names: set[str] | None, *, keep, spectra: bool, device,
                   bar) -> RunDecomp:
    mods, specs = {}, []
    for d in s:
        analysed = names is None or d.name in names
        if analysed:
            mods[d.name] = decompose(d, keep=keep if s.method == "full" else None, device=device)
        if spectra:  # the decomposition's S when it kept the whole spectrum, else svdvals
            whole = analysed and (keep is None or s.method != "full")
            sv = mods[d.name].S if whole else update_svd(d, compute_uv=False)
            specs.append(ModuleSpectrum(d.name, d.layer, d.module, d.rank, d.d_out, d.d_in, sv))
        bar.update(1)
    return RunDecomp(s.run, s.method, s.rank, s.seed, s.meta, mods, tuple(specs))


def base_weights(runs: list[RunDecomp]) -> dict[str, torch.Tensor]:
    """W_0 of every analysed module, from the runs' base model, keyed by the runs' names."""
    model_path = runs[0].manifest.get("model_path") or runs[0].manifest.get("model")
    base = load_backbone(model_path)
    infos = {i.name for i in find_linear_modules(base)}
    names = {n for r in runs for n in r.modules}
    out = {}
    for n in names:
        hit = match_name(n, infos)
        if hit is not None:
            out[n] = linear_weight(base.get_submodule(hit)).detach().double()
    return out


def base_svds(weights: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """W_0's thin SVD (U, S, Vh) in float64, once per module: shared by ΔW-vs-W and intruders."""
    return {n: dense_svd(w, dtype=torch.float64) for n, w in weights.items()}
