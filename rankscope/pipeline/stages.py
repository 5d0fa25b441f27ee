"""The stages of a study, and the one rule that says whether a stage is up to date.

    sweep ─► compare ─► truncate ─► recommend ─► report

Every verb, ``rankscope run``, ``rankscope figures`` and the report go through here; no other
module runs another module's stage. A stage's *stamp* is a hash of the finished runs'
manifests, the stage's own settings, the stamps of the stages it reads and the version of the
results format (``store.results.RESULTS_VERSION``); a stage is up to
date when its stamp equals the one ``results/.stages.json`` recorded when it last completed.
So a sweep that gains a run, or a stage asked with other settings, makes that stage and
every stage after it stale — never a table reused because its file exists.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import pandas as pd

from rankscope.errors import InputError
from rankscope.recommend.inputs import check_runs
from rankscope.store.atomic import atomic_dir, atomic_write_json, atomic_write_text
from rankscope.store.results import RESULTS_VERSION, check_results_out, check_same_sweep, \
    load_tables, prepare_out, save_tables
from rankscope.store.runs import MANIFEST, SWEEP_FILE, find_runs, sweep_root

STAGES = ("sweep", "compare", "truncate", "recommend", "report")
STAMPS = ".stages.json"
TRUNCATION_KS = (1, 2, 4, 8, 16, 32, 64)
READS = {"compare": (), "truncate": (), "recommend": ("compare", "truncate"),
         "report": ("compare", "truncate", "recommend")}
Log = Callable[[str], None]
UP_TO_DATE = "up to date, skipped"


def runs_stamp(runs: str | Path) -> str:
    """A hash of every finished run's name and manifest under ``runs`` (a sweep or one run)."""
    h = hashlib.sha256()
    for run_dir in find_runs(runs):
        h.update(run_dir.name.encode() + b"\0" + (run_dir / MANIFEST).read_bytes())
    return h.hexdigest()


class Stamps:
    """What each stage of a results folder was last computed from: ``<results>/.stages.json``."""

    def __init__(self, results: str | Path, runs: str | Path):
        self.path, self.runs = Path(results) / STAMPS, runs_stamp(runs)
        try:
            done = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (ValueError, OSError, UnicodeDecodeError):   # unreadable: every stage is redone
            done = {}
        self.done = done if isinstance(done, dict) else {}

    def stamp(self, stage: str, settings: dict) -> str:
        """The stamp ``stage`` has now with ``settings``: runs, settings, upstream stamps."""
        upstream = [(s, (self.done.get(s) or {}).get("stamp")) for s in READS[stage]]
        doc = json.dumps([stage, self.runs, settings, upstream, RESULTS_VERSION], sort_keys=True,
                         default=str)
        return hashlib.sha256(doc.encode()).hexdigest()

    def fresh(self, stage: str, settings: dict) -> bool:
        """True when ``stage`` last completed on these runs, settings and upstream stamps."""
        return (self.done.get(stage) or {}).get("stamp") == self.stamp(stage, settings)

    def settings(self, stage: str) -> dict:
        """The settings ``stage`` last completed with ({} when it never did)."""
        return (self.done.get(stage) or {}).get("settings") or {}

    def mark(self, stage: str, settings: dict) -> None:
        """Record that ``stage`` completed with ``settings``."""
        self.done[stage] = {"stamp": self.stamp(stage, settings), "settings": settings}
        atomic_write_json(self.path, self.done)


def write_verdict(results: Path) -> str:
    """Build the verdict from the tables in ``results``: verdict.md, verdict.csv, verdict.json."""
    from rankscope.analysis.verdict_text import verdict

    frames = load_tables(results)
    if "metrics" not in frames:
        raise InputError(f"{results} has no metrics.csv: run `rankscope compare` first")
    text, evidence = verdict(frames)
    atomic_write_text(results / "verdict.csv", pd.DataFrame(evidence["tests"]).to_csv(index=False))
    atomic_write_json(results / "verdict.json", evidence)
    atomic_write_text(results / "verdict.md", text)
    return text


def compare_stage(runs: str | Path, results: str | Path, *, grid_layers: list[int] | None = None,
                  device: str = "auto", overwrite: bool = False, force: bool = True,
                  progress: bool = True, log: Log = print) -> bool:
    """Spectra, φ, convergence, ΔW vs W, intruders and (runs with snapshots) the energy rank
    against tokens of ``runs`` into ``results``, + verdict.

    A folder holding this sweep's results is updated in place; a new one (or one replaced
    with ``overwrite``) is written beside and renamed into place when done.

    Returns:
        True when the stage ran, False when it was up to date (only without ``force``).
    Raises:
        InputError: no finished runs; ``results`` holds other content without ``overwrite``.
    """
    from rankscope.analysis.compare import compare_frames
    from rankscope.analysis.snapshots import snapshot_table

    find_runs(runs)                         # every check before the output folder is touched
    results = Path(results)
    update = check_results_out(results, runs, overwrite=overwrite)
    settings = {"grid_layers": sorted(grid_layers) if grid_layers else None}
    stamps = Stamps(results, runs) if update else None
    if not force and stamps is not None and stamps.fresh("compare", settings):
        log(f"compare {runs} → {results}: {UP_TO_DATE}")
        return False
    frames = compare_frames(runs, grid_layers=grid_layers, device=device, progress=progress)
    snapshots = snapshot_table(runs, device=device)     # runs trained with ``snapshots``
    if not snapshots.empty:
        frames["snapshots"] = snapshots
    log(f"compare {runs} → {results}")
    if update:
        _write_compare(results, frames, runs, settings, stamps)
    else:
        with atomic_dir(results, overwrite=True) as tmp:
            _write_compare(tmp, frames, runs, settings, Stamps(tmp, runs))
    return True


def _write_compare(folder: Path, frames: dict, runs, settings: dict, stamps: Stamps) -> None:
    save_tables(folder, frames, inputs={"runs": str(runs)})
    write_verdict(folder)
    stamps.mark("compare", settings)          # stamps of ``folder``


def truncate_stage(runs: str | Path, results: str | Path, *, ks=TRUNCATION_KS,
                   lora_min_rank: int | None = None, device: str = "auto", force: bool = True,
                   progress: bool = True, log: Log = print) -> pd.DataFrame | None:
    """The truncation test of ``runs`` into ``results`` (and the verdict, when compare ran).

    Returns:
        The truncation curve, or None when the stage was up to date (only without ``force``).
    Raises:
        InputError: no full run, no sweep.yaml, or ``results`` holds another sweep's tables.
    """
    from rankscope.analysis.truncate import truncate_sweep
    from rankscope.store.atomic import check_out_dir

    check_out_dir(results, overwrite=True)  # a file, or an unwritable parent: refused now
    check_same_sweep(runs, results)
    settings = {"ks": sorted(int(k) for k in ks), "lora_min_rank": lora_min_rank}
    stamps = Stamps(results, runs)
    if not force and stamps.fresh("truncate", settings):
        log(f"truncate {runs} → {results}: {UP_TO_DATE}")
        return None
    curve, summary = truncate_sweep(runs, ks=tuple(settings["ks"]), lora_min_rank=lora_min_rank,
                                    device=device, progress=progress)
    log(f"truncate {runs} → {results}: k = " + ", ".join(map(str, settings["ks"])))
    results = prepare_out(results)          # made only once the tables exist
    save_tables(results, {"truncation": curve, "truncation_summary": summary},
                inputs={"runs": str(runs)})
    if (results / "metrics.csv").exists():
        write_verdict(results)
    stamps.mark("truncate", settings)
    return curve


def analyses(runs: str | Path, results: str | Path, *, grid_layers: list[int] | None = None,
             truncate: dict | None = None, with_truncation: bool = True, device: str = "auto",
             progress: bool = True, log: Log = print) -> dict[str, pd.DataFrame]:
    """compare and (when the sweep has a full run and a sweep.yaml) truncate, unless fresh.

    Grid layers asked for are added to those computed before, so figures that ask for
    different layers of one sweep do not undo each other. ``truncate`` holds its options
    (``ks``, ``lora_min_rank``; None: the defaults); ``with_truncation=False`` skips it.

    Returns:
        Every table of ``results``.
    """
    from rankscope.store.runs import read_manifest

    check_same_sweep(runs, results)
    stamps = Stamps(results, runs) if Path(results).is_dir() else None
    had = (stamps.settings("compare").get("grid_layers") or []) if stamps else []
    layers = sorted(set(had) | set(grid_layers or [])) or None
    compare_stage(runs, results, grid_layers=layers, device=device, force=False,
                  progress=progress, log=log)
    has_full = any(read_manifest(d).get("method") == "full" for d in find_runs(runs))
    if with_truncation and has_full:
        if (sweep_root(runs) / SWEEP_FILE).exists():
            opts = truncate or {}
            truncate_stage(runs, results, ks=opts.get("ks") or TRUNCATION_KS,
                           lora_min_rank=opts.get("lora_min_rank"), device=device, force=False,
                           progress=progress, log=log)
        else:
            log(f"truncation test skipped: {sweep_root(runs)} has no {SWEEP_FILE}")
    return load_tables(results)


def _work_only(log: Log) -> Log:
    """``log`` without the lines of stages found up to date (a later stage's own checks)."""
    return lambda line: None if line.endswith(UP_TO_DATE) else log(line)


def recommend_stage(runs: str | Path, results: str | Path, *, budget=None,
                    targets: tuple[str, ...] | None = None, validate: bool = False,
                    force: bool = True, progress: bool = True, log: Log = print):
    """A LoRA rank per module of ``runs``, from up-to-date tables, into ``results``.

    Returns:
        The ``Recommendation``, or None when it was up to date (only without ``force``).
    Raises:
        InputError: unfinished or mixed runs, a bad budget (before any analysis runs), and
            the errors of the analyses.
    """
    from rankscope.recommend.stage import check_budget, recommend, validation_configs, \
        with_validation
    from rankscope.recommend.validate import validate as retrain

    sets = check_runs(runs)
    budget = check_budget(sets, budget, targets=targets)
    frames = analyses(runs, results, progress=progress, log=_work_only(log))
    settings = {"budget": budget, "targets": list(targets) if targets else None,
                "validate": validate}
    stamps = Stamps(results, runs)
    if not force and stamps.fresh("recommend", settings):
        log(f"recommend {runs} → {results}: {UP_TO_DATE}")
        return None
    log(f"recommend {runs} → {results}")
    rec = recommend(runs, sets, frames, results, budget=budget, targets=targets)
    if validate:
        val = retrain(runs, validation_configs(rec, sets), sets=sets, out=results,
                      progress=progress, log=log)
        rec = with_validation(rec, val, results)
    stamps.mark("recommend", settings)
    return rec


def report_stage(runs: str | Path, results: str | Path, *, progress: bool = True,
                 log: Log = print) -> Path:
    """report.html and report.md of ``runs``, after every earlier stage is brought up to date.

    A recommendation made before with a budget, targets or validation is redone with the
    same settings when the runs changed; none made before is made with the defaults.

    Returns:
        The path of report.html.
    """
    from rankscope.outputs.report import build_report

    sets = check_runs(runs)
    check_same_sweep(runs, results)         # before anything is computed into the folder
    last = Stamps(results, runs).settings("recommend")   # recommend brings the analyses up to date
    recommend_stage(runs, results, budget=last.get("budget"),
                    targets=tuple(last["targets"]) if last.get("targets") else None,
                    validate=bool(last.get("validate")), force=False, progress=progress, log=log)
    stamps = Stamps(results, runs)
    html = build_report(runs, results, sets=sets, frames=load_tables(results), log=log)
    stamps.mark("report", {})
    return html
