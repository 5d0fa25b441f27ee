"""The one-command end-to-end job: sweep → analyses → truncation test → recommendation → report.

Resumable like the sweep: finished runs are skipped, and a stage that is up to date (the one
rule of ``pipeline.stages``) is skipped too. Its inputs (the output folder, the model, a
``--data`` file, the budget) are checked before anything trains.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from rankscope.train.config import SweepConfig, build_sweep
from rankscope.errors import InputError
from rankscope.pipeline.stages import STAGES, TRUNCATION_KS, compare_stage, recommend_stage, \
    report_stage, truncate_stage



# The default job's question, when neither a config nor --task, --data or --model names one:
# MiniLM's topic classification (21 topics of chatterbot questions). Its runs train to a
# plateau within the quick profile on 2 CPU cores, so its verdict can be more than
# "inconclusive"; SmolLM2's news adaptation needs ~100× the compute per run to get there.
DEFAULT_TASK = "topic"


def default_profile() -> str:
    """paper on a GPU, quick on a CPU."""
    return "paper" if torch.cuda.is_available() else "quick"


def job_config(*, config: str | Path | None = None, profile: str | None = None,
               overrides: dict | None = None) -> SweepConfig:
    """The sweep of the job: the profile (by device), then the YAML, then the flags; the
    default task (``DEFAULT_TASK``) when none of them names a task, data or model."""
    overrides = dict(overrides or {})
    if config is None and all(overrides.get(k) is None for k in ("task", "data", "model")):
        overrides["task"] = DEFAULT_TASK
    return build_sweep(profile=profile or default_profile(), yaml_path=config, overrides=overrides)


def cheapest_adapter(cfg: SweepConfig) -> int | None:
    """Parameters of the smallest rank-1 adapter the recommendation could give, d_out + d_in.

    The candidates are those of ``recommend``: the LoRA targets when the sweep trains LoRA,
    else every linear module of the backbone. Shapes come from the model's config alone (the
    model is built on the meta device: no weight is read).

    Returns:
        The smallest d_out + d_in, or None when no target names a module (the sweep itself
        then refuses the targets, before training).
    Raises:
        InputError, ModelNotFoundError: a model that cannot be resolved or configured.
    """
    from transformers import AutoConfig, AutoModel

    from rankscope.train.models import find_linear_modules, is_target, quiet_transformers, \
        resolve_model

    path = resolve_model(cfg.model)
    try:
        with quiet_transformers(), torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"cannot load model {cfg.model}: {str(e).strip().splitlines()[0]}") from None
    infos = find_linear_modules(model)
    if "lora" in cfg.methods and tuple(cfg.targets) != ("all-linear",):
        infos = [i for i in infos if any(is_target(i.name, t) for t in cfg.targets)]
    return min((i.d_out + i.d_in for i in infos), default=None)


def check_job(cfg: SweepConfig, out: str | Path, *, budget=None) -> int | None:
    """Check what the job can check before training; returns the budget as a count.

    Raises:
        InputError: ``out`` (or its ``runs``/``results``) is a file; a model that cannot be
            resolved; a ``--data`` file that is missing or does not match its schema; a
            budget that is not a parameter count, or smaller than one rank-1 adapter of the
            sweep's modules.
        ModelNotFoundError: an unknown model name.
    """
    from rankscope.train.user_files import load_user_file
    from rankscope.train.models import resolve_model
    from rankscope.recommend.evidence import parse_budget

    out = Path(out)
    for path in (out, out / "runs", out / "results"):
        if path.exists() and not path.is_dir():
            raise InputError(f"output path {path} exists and is not a folder")
    resolve_model(cfg.model)
    if cfg.data is not None:
        load_user_file(cfg.data, kind=cfg.task_kind)
    if budget is None:
        return None
    count = parse_budget(budget)
    cheapest = cheapest_adapter(cfg)
    if cheapest is not None and count < cheapest:
        raise InputError(f"budget {count:,} parameters is smaller than one rank-1 adapter "
                         f"({cheapest:,} parameters)")
    return count


def run_job(cfg: SweepConfig, out: str | Path, *, budget: int | str | None = None,
            validate: bool = False, progress: bool = True,
            log: Callable[[str], None] = print) -> Path:
    """Run every stage into ``out`` (``out/runs``, ``out/results``); returns the report's path.

    Args:
        budget: trainable LoRA parameters for the recommendation (an int, or ``1.5M``, …).
        validate: retrain the recommendation beside a uniform rank (``recommend --validate``).
        log: where the stage lines go (one per stage, then the report's path).
    Raises:
        InputError: see ``check_job`` (raised before anything is trained or written), and
            the errors of each stage.
    """
    from rankscope.store.lock import LOCK_FILE, folder_lock

    budget = check_job(cfg, out, budget=budget)
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {out}: {e.strerror}") from None
    try:
        with folder_lock(out, what="job"):      # one job per folder: its stages never race
            return _stages(cfg, out, budget=budget, validate=validate, progress=progress, log=log)
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(out, ignore_errors=True)    # failed before writing: leave no folder
        raise


def _stages(cfg: SweepConfig, out: Path, *, budget, validate: bool, progress: bool,
            log: Callable[[str], None]) -> Path:
    from rankscope.train.sweep import run_sweep

    runs, results = out / "runs", out / "results"
    t0 = time.perf_counter()

    def stage(i: int, text: str) -> None:
        log(f"[{i}/{len(STAGES)}] {text}  ({time.perf_counter() - t0:.0f}s)")

    def sub(text: str) -> None:
        log("      " + text)

    stage(1, f"sweep: {len(cfg.runs())} runs of {cfg.model} on {cfg.task or cfg.data} "
             f"({cfg.steps} steps each, profile {cfg.profile}) into {runs}")
    run_sweep(cfg, runs, progress=progress, log=sub)
    stage(2, f"compare: spectra, subspace similarity, convergence, ΔW vs W, intruders → {results}")
    compare_stage(runs, results, device=cfg.device, force=False, progress=progress, log=sub)
    if "full" in cfg.methods:
        stage(3, "truncate: W_0 + trunc_k(ΔW_full) re-evaluated for k = "
                 + ", ".join(map(str, TRUNCATION_KS)))
        truncate_stage(runs, results, device=cfg.device, force=False, progress=progress, log=sub)
    else:
        stage(3, "truncate: skipped (the sweep has no full fine-tuning run)")
    stage(4, "recommend: ranks per module and a PEFT LoraConfig")
    recommend_stage(runs, results, budget=budget, validate=validate, progress=progress, log=sub)
    stage(5, "report: report.html and report.md")
    report = report_stage(runs, results, progress=progress, log=sub)
    log(f"done in {time.perf_counter() - t0:.0f}s; report: {report}")
    return Path(report)
