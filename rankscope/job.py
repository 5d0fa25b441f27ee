"""The one-command end-to-end job: sweep → analyses → truncation test → recommendation → report.

Resumable like the sweep: finished runs are skipped, and an analysis stage whose inputs (the
runs' manifests) have not changed since it last completed is skipped too.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from .config import SweepConfig, build_sweep
from .io import atomic_write_json

STAGES = ("sweep", "compare", "truncate", "recommend", "report")
TRUNCATION_KS = (1, 2, 4, 8, 16, 32, 64)


def default_profile() -> str:
    """paper on a GPU, quick on a CPU."""
    return "paper" if torch.cuda.is_available() else "quick"


def job_config(*, config: str | Path | None = None, profile: str | None = None,
               overrides: dict | None = None) -> SweepConfig:
    """The sweep of the job: the profile (by device), then the YAML, then the flags."""
    return build_sweep(profile=profile or default_profile(), yaml_path=config, overrides=overrides)


def _runs_stamp(runs: Path) -> str:
    h = hashlib.sha256()
    for m in sorted(runs.glob("*/manifest.json")):
        h.update(m.read_bytes())
    return h.hexdigest()


class _Stages:
    """Which analysis stages finished on which runs: ``results/.stages.json``."""

    def __init__(self, results: Path, stamp: str):
        self.path, self.stamp = results / ".stages.json", stamp
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def fresh(self, stage: str) -> bool:
        return self.done.get(stage) == self.stamp

    def mark(self, stage: str) -> None:
        self.done[stage] = self.stamp
        atomic_write_json(self.path, self.done)


def run_job(cfg: SweepConfig, out: str | Path, *, budget: float | None = None,
            validate: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """Run every stage into ``out`` (``out/runs``, ``out/results``); returns the report's path."""
    from .compare import compare
    from .recommend import recommend
    from .report import build_report
    from .results import prepare_out, save_tables, write_verdict
    from .sweep import run_sweep
    from .truncate import truncate_sweep

    out = Path(out)
    runs, results = out / "runs", out / "results"
    t0 = time.perf_counter()

    def stage(i: int, text: str) -> None:
        log(f"[{i}/{len(STAGES)}] {text}  ({time.perf_counter() - t0:.0f}s)")

    stage(1, f"sweep: {len(cfg.runs())} runs of {cfg.model} on {cfg.task or cfg.data} "
             f"({cfg.steps} steps each, profile {cfg.profile}) into {runs}")
    run_sweep(cfg, runs, progress=progress, log=lambda s: log("      " + s))
    prepare_out(results)
    stages = _Stages(results, _runs_stamp(runs))
    stage(2, f"compare: spectra, subspace similarity, convergence, ΔW vs W, intruders → {results}")
    if not stages.fresh("compare"):
        compare(runs, results, progress=progress)
        stages.mark("compare")
    if "full" in cfg.methods:
        stage(3, "truncate: W_0 + trunc_k(ΔW_full) re-evaluated for k = "
                 + ", ".join(map(str, TRUNCATION_KS)))
        if not stages.fresh("truncate"):
            curve, summary = truncate_sweep(runs, ks=TRUNCATION_KS, device=cfg.device,
                                            progress=progress)
            save_tables(results, {"truncation": curve, "truncation_summary": summary},
                        inputs={"runs": str(runs)})
            write_verdict(results)
            stages.mark("truncate")
    else:
        stage(3, "truncate: skipped (the sweep has no full fine-tuning run)")
    stage(4, "recommend: ranks per module and a PEFT LoraConfig")
    recommend(runs, results, budget=budget, validate=validate, progress=progress, log=log)
    stage(5, "report: report.html and report.md")
    report = build_report(runs, results, progress=progress, log=log)
    log(f"done in {time.perf_counter() - t0:.0f}s; report: {report}")
    return Path(report)
