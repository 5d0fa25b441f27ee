"""Run the pure spectral functions over every module of every source, into tidy DataFrames."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch

from rankscope.analysis import deltas as _deltas
from rankscope.analysis.decompose import update_svd
from rankscope.analysis.dora import from_peft_adapter
from rankscope.analysis.deltas import DeltaSet, ModuleDelta
from rankscope.analysis.tables import add_module_rows, spectra_frames
from rankscope.errors import InputError
from rankscope.linalg.spectra import svd_device
from rankscope.linalg.topk import SvdChoice, parse_svd
from rankscope.store.atomic import atomic_dir, atomic_write_json, check_out_apart
from rankscope.store.provenance import provenance
from rankscope.store.runs import MANIFEST


def _ids(ds: DeltaSet, d: ModuleDelta) -> dict:
    return {"run": ds.run, "method": ds.method,
            "rank": d.rank if ds.method == "lora" else ds.rank, "seed": ds.seed,   # DoRA: its r
            "layer": d.layer, "module": d.module, "name": d.name}


def analyze_deltas(sets: Iterable[DeltaSet], *, dtype: torch.dtype = torch.float32,
                   device: str | None = None, progress: bool = True,
                   svd: SvdChoice = SvdChoice("auto")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spectra and effective-rank measures of every module of every DeltaSet.

    Modules are streamed: each ΔW is decomposed once and dropped before the next is read.
    ``svd`` says which dense updates take only their top-K singular values (with the exact
    ‖ΔW‖_F beside them); LoRA factors are always decomposed exactly.

    Returns:
        ``(spectra, modules)``, see ``tables.spectra_frames``.
    """
    from tqdm.auto import tqdm

    sets = list(sets)
    total = sum(ds.n_modules or 0 for ds in sets) or None
    bar = tqdm(total=total, desc="analyze", unit="module", disable=not progress, file=sys.stderr)
    spectra, modules = [], []
    try:
        for ds in sets:
            for d in ds:
                k = None if d.factored else svd.topk_for((d.d_out, d.d_in))
                s = update_svd(d, compute_uv=False, dtype=dtype, device=device, topk=k)
                fro = None if k is None else float(torch.linalg.vector_norm(d.dense.double()))
                add_module_rows(spectra, modules, _ids(ds, d), s, shape=(d.d_out, d.d_in), fro=fro)
                bar.set_postfix_str(f"{ds.run}:{d.name}", refresh=False)
                bar.update(1)
    except BaseException:
        bar.leave = False       # erase the bar, so that the error is a line of its own
        raise
    finally:
        bar.close()
    return spectra_frames(spectra, modules)


def resolve_sources(runs: str | Path | None = None, *, base: str | None = None,
                    adapter: str | Path | None = None,
                    finetuned: str | Path | None = None) -> list[DeltaSet]:
    """The DeltaSets named by one of the three forms of ``rankscope analyze``.

    Raises:
        InputError: no form, or an inconsistent mix of them.
    """
    if runs is not None:
        if adapter is not None or finetuned is not None:
            raise InputError("give run folders, or --adapter, or --finetuned: not several")
        return _deltas.from_runs(runs)
    if adapter is not None and finetuned is not None:
        raise InputError("give --adapter or --finetuned, not both")
    if adapter is not None:
        return [from_peft_adapter(adapter, base=base)]
    if finetuned is not None:
        if base is None:
            raise InputError("--finetuned needs --base (the model it was fine-tuned from)")
        return [_deltas.from_model_pair(base, finetuned)]
    raise InputError("nothing to analyze: give run folders, --adapter or --finetuned")


def analyze(runs: str | Path | None = None, *, base: str | None = None,
            adapter: str | Path | None = None, finetuned: str | Path | None = None,
            out: str | Path | None = None, overwrite: bool = False, float64: bool = False,
            device: str | None = None, svd: str | None = "auto",
            progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Analyze the spectra of weight updates; the Python form of ``rankscope analyze``.

    Args:
        runs: a rankscope run or sweep folder.
        base: the base model (registry name, folder or hub id) of an adapter or fine-tuned model.
        adapter: a PEFT LoRA adapter folder.
        finetuned: a fully fine-tuned model (registry name, folder or hub id).
        out: when given, write ``spectra.csv``, ``modules.csv`` and ``manifest.json`` there,
            atomically (all three or none).
        overwrite: replace an ``out`` folder that has other content.
        float64: dense SVDs in float64 instead of float32.
        device: where dense SVDs run: "auto" (CUDA when present, the default), "cpu", "cuda".
        svd: "exact", "topk:K" (the top K singular values of each dense update, with the
            exact ‖ΔW‖_F: energy ranks above K are "> K") or "auto" (exact when the smaller
            side is at most ``topk.AUTO_TOPK_ABOVE``, else top-``topk.AUTO_TOPK_K``).
    Returns:
        ``(spectra, modules)`` DataFrames, see ``analyze_deltas``.
    """
    if out is not None:
        from rankscope.store.atomic import check_out_dir

        check_out_dir(out, overwrite=overwrite)     # refuse before any work is done
        check_out_apart(out, (runs, base, adapter, finetuned))
    device = svd_device(device)
    choice = parse_svd(svd)
    sets = resolve_sources(runs, base=base, adapter=adapter, finetuned=finetuned)
    dtype = torch.float64 if float64 else torch.float32
    spectra, modules = analyze_deltas(sets, dtype=dtype, device=device, progress=progress,
                                      svd=choice)
    if out is not None:
        inputs = {"runs": runs, "base": base, "adapter": adapter, "finetuned": finetuned}
        manifest = {"inputs": {k: str(v) for k, v in inputs.items() if v is not None},
                    "sources": [{"run": s.run, "method": s.method, "rank": s.rank, "seed": s.seed}
                                for s in sets],
                    "svd_dtype": str(dtype).replace("torch.", ""), "device": device,
                    "svd": str(choice),
                    **provenance()}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            spectra.to_csv(tmp / "spectra.csv", index=False)
            modules.to_csv(tmp / "modules.csv", index=False)
            atomic_write_json(tmp / MANIFEST, manifest)
    return spectra, modules


