"""Paper figures end to end: an experiment YAML → sweep(s) → analyses → PNG + CSV + caption.

Each resolved sweep of an experiment (``outputs.experiments.resolve``) trains under
``<runs-root>/<file stem>-<variant>-<hash of its config>`` (experiments with the same sweep
share one folder and train it once) and is analysed into ``<that folder>-results`` through
``pipeline.stages`` (redone only when its runs or options change).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from rankscope.outputs.experiments import caption, load_experiment, resolve, write_figure
from rankscope.outputs.figure_data import BUILDERS
from rankscope.outputs.in_shape import caption_note, evaluate, figure_gates, reproduced
from rankscope.pipeline.stages import analyses
from rankscope.train.config import SweepConfig, to_dict


def sweep_folder(cfg: SweepConfig, file: Path, variant: str, runs_root: Path) -> Path:
    """``<runs_root>/<file stem>-<variant>-<hash of the config>``: equal configs share it."""
    view = {k: v for k, v in to_dict(cfg).items()      # how, and under which paper's name, not what
            if k not in ("device", "strategy", "protocol")}
    digest = hashlib.sha1(json.dumps(view, sort_keys=True).encode()).hexdigest()[:8]
    return runs_root / f"{file.stem}-{variant}-{digest}"


def ensure_results(cfg: SweepConfig, folder: Path, *, truncate: dict | None,
                   grid_layers: list[int] | None, log: Callable[[str], None],
                   progress: bool) -> dict:
    """Train the sweep (finished runs are skipped), then its analyses unless up to date.

    Returns:
        The tables of the results folder ``<folder>-results``.
    """
    from rankscope.store.runs import SWEEP_FILE, run_name
    from rankscope.store.runs import finished_manifest
    from rankscope.train.sweep import claim_sweep_dir, run_sweep

    names = sorted(run_name(m, r, s) for m, r, s in cfg.runs())
    if (folder / SWEEP_FILE).exists() and all(finished_manifest(folder / n) for n in names):
        claim_sweep_dir(folder, cfg)                 # same config, or InputError
    else:
        log(f"sweep {folder}: {len(names)} runs")
        run_sweep(cfg, folder, progress=progress, log=log)
    out = folder.with_name(folder.name + "-results")
    return analyses(folder, out, grid_layers=grid_layers, truncate=truncate,
                    with_truncation=truncate is not None, device=cfg.device,
                    progress=progress, log=log)


def run_experiment(path: str | Path, *, variant: str, out: str | Path,
                   runs_root: str | Path = "runs", log: Callable[[str], None] = print,
                   progress: bool = False) -> Path:
    """Sweep, analyse and draw one experiment's figure into ``out``. Returns the PNG path."""
    exp = load_experiment(path)
    cfgs, settings, trunc = resolve(exp, variant)
    layer = settings.get("layer")
    grid_layers = settings.get("layers") or ([layer] if layer is not None else None)
    results, sweeps = {}, {}
    for (label, cfg), (file, _) in zip(cfgs.items(), exp.sweeps.values()):
        folder = sweep_folder(cfg, file, variant, Path(runs_root))
        res = ensure_results(cfg, folder, truncate=trunc, grid_layers=grid_layers, log=log,
                             progress=progress)
        results[label], sweeps[label] = res, str(folder)
    log(f"draw {exp.name}")
    df = BUILDERS[exp.figure](results, **settings)
    checks, gate_rows = evaluate(df, list(exp.in_shape)), figure_gates(results)
    status = reproduced(checks, gate_rows)              # inconclusive when a gate failed
    meta = {"format": "rankscope.figure/1", "experiment": str(exp.path), "result": exp.result,
            "variant": variant,
            "caption": f"{caption(exp, variant, cfgs)} {caption_note(status, checks, gate_rows)}",
            "reproduced": status, "in_shape": checks, "gates": gate_rows, "sweeps": sweeps,
            "settings": settings, "configs": {k: to_dict(c) for k, c in cfgs.items()}}
    png = write_figure(df, Path(out), exp.name, meta=meta)
    log(f"wrote {png} and {png.with_suffix('.csv')}")
    return png
