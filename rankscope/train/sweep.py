"""The grid of runs: one folder per (method, rank, seed); finished runs skipped, the rest resumed."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Callable

import yaml

from rankscope.errors import InputError
from rankscope.store.atomic import atomic_write_text
from rankscope.store.lock import folder_lock, run_lock
from rankscope.store.runs import PLANTED, SWEEP_FILE, finished_manifest, read_tensors, \
    tensor_hash, write_updates
from rankscope.train.config import SweepConfig, changed_fields, dump_yaml, replace, to_dict
from rankscope.train.data import TaskData, prepare
from rankscope.train.device import leave_dist, setup_dist, use_bf16
from rankscope.train.evaluation import base_evaluation
from rankscope.train.model_setup import check_targets, load_task_model
from rankscope.train.lr_search import rate_for, search
from rankscope.train.run import train_run
from rankscope.train.run_folder import claim_run_dir, run_config_text


def claim_sweep_dir(out: Path, cfg: SweepConfig) -> None:
    """Create the sweep folder and record its config, or refuse one started with another.

    Raises:
        InputError: ``out`` is not writable, or holds a sweep of a different configuration.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"     # per process: torchrun ranks race
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"output folder {out} is not writable ({e.strerror})") from None
    path = out / SWEEP_FILE
    # labels, not values: the device a run used is in its manifest, and a profile or protocol is
    # compared by the values it set (the same YAML run by ``rankscope run`` and by ``figures`` is
    # one sweep; so is one α = 2r sweep that two papers' figures read)
    labels = ("device", "profile", "protocol")
    mine = {k: v for k, v in to_dict(cfg).items() if k not in labels}
    if path.exists():
        old = {k: v for k, v in (yaml.safe_load(path.read_text()) or {}).items()
               if k not in labels}
        diff = changed_fields(old, mine)
        if diff:
            raise InputError(f"{out} holds a sweep started with another config (differs in: "
                             f"{', '.join(diff)}); rerun with the same config or another --out")
        return
    atomic_write_text(path, "# written by rankscope sweep; the grid and settings of this folder\n"
                      + dump_yaml(cfg))


def record_teacher(out: Path, task: TaskData) -> None:
    """Write a planted task's ΔW* to ``out/planted.safetensors`` once; check it if it is there.

    Raises:
        InputError: the folder holds another teacher's ΔW* (by ``tensor_hash``).
    """
    if task.teacher is None:
        return
    path = out / PLANTED
    if path.exists():
        held, _ = read_tensors(path)
        if tensor_hash(held) != task.planted_hash:
            raise InputError(f"{path} holds another planted update than this config draws; "
                             "use another --out or remove it")
        return
    cfg_meta = {k: json.dumps(v) for k, v in task.teacher.meta.items()}
    write_updates(path, task.teacher.factors, method="planted", metadata=cfg_meta)


def load_checked_model(cfg: SweepConfig, task: TaskData, *, world: int):
    """The base model with the task's head, once the grid is checked against it and ``world``.

    Raises:
        InputError: an unloadable model, a target it lacks, a rank a target cannot hold, or a
            batch that ``world`` processes cannot share.
    """
    if cfg.batch_size % world:
        raise InputError(f"batch_size {cfg.batch_size} is not divisible by {world} processes")
    model = load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    check_targets(model, cfg.targets, cfg.ranks if "lora" in cfg.methods else ())
    return model


def summary_line(m: dict) -> str:
    """One line for a finished run: held-out metric before → after, time, throughput."""
    b, a = m["eval_before"], m["eval_after"]
    key = "accuracy" if "accuracy" in a else "loss"
    tps = f"{m['tokens_per_s']:.0f} tok/s" if m.get("tokens_per_s") else "resumed"
    return (f"{m['run']:<14} {key} {b[key]:.4f} → {a[key]:.4f}  "
            f"{m['wall_time_s']:.0f}s  {tps}  peak {m['peak_memory_mb']:.0f} MB")


def run_sweep(cfg: SweepConfig, out: str | Path, *, shard: tuple[int, int] | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Train every run of the grid (or of its ``shard``) into ``out/<run>``; finished runs
    are skipped.

    A shard (i, n) trains the runs i, i + n, i + 2n, … of the grid (1-based): n processes or
    jobs given 1/n … n/n cover it into one folder. They share the set-up (the base model's
    evaluation, the teacher, the learning-rate search) under the folder's lock, each waiting
    for the one doing it, and train each run under that run's own lock.

    Returns:
        The manifests of the runs trained or found, in grid order (``{}`` for each run on
        processes other than the main one).
    Raises:
        InputError: bad inputs (data, model, targets, ranks, output folder, shard), found
            before anything is written; another process training into ``out`` (without
            ``shard``) or training one of this shard's runs.
    """
    out = Path(out)
    runs = shard_runs(cfg.runs(), shard)
    dist = setup_dist(cfg.device)
    task = prepare(cfg)
    base = load_checked_model(cfg, task, world=dist.world)
    claim_sweep_dir(out, cfg)           # only once the inputs are good: nothing half-written
    main = dist.main                    # a torchrun's ranks are one sweep: its main holds locks
    if shard is None:                   # one process trains the folder's runs
        with folder_lock(out) if main else contextlib.nullcontext():
            cfg, rates, base_eval = _setup(cfg, task, base, out, dist=dist, log=log)
            del base
            return _train_runs(cfg, task, out, runs, base_eval, rates=rates, dist=dist,
                               progress=progress, log=log)
    with folder_lock(out, wait=True) if main else contextlib.nullcontext():
        cfg, rates, base_eval = _setup(cfg, task, base, out, dist=dist, log=log)
    del base
    return _train_runs(cfg, task, out, runs, base_eval, rates=rates, dist=dist,
                       progress=progress, log=log)


def shard_runs(runs: list, shard: tuple[int, int] | None) -> list:
    """The runs of shard (i, n): the grid's i-th, (i + n)-th, … (all of them without a shard).

    Raises:
        InputError: not 1 ≤ i ≤ n.
    """
    if shard is None:
        return list(runs)
    i, n = shard
    if not 1 <= i <= n:
        raise InputError(f"--shard: expected i/n with 1 <= i <= n, got {i}/{n}")
    return list(runs)[i - 1::n]


def _setup(cfg: SweepConfig, task: TaskData, base, out: Path, *, dist, log):
    """What every run of the folder shares: the teacher, the base model's held-out metrics, the
    learning rates (searched once, then read back). Returns (the config at those rates, the
    searched LoRA ranks' rates (``lr_search.search``; empty without a search), the base
    evaluation as (metrics, per-example numbers))."""
    if dist.main:
        record_teacher(out, task)
    examples: dict = {}
    metrics = base_evaluation(base, task, out, device=dist.device, examples=examples,
                              bf16=use_bf16(cfg.bf16, dist.device), write=dist.main)
    rates = {}
    if cfg.lr_search:
        cfg, rates = search(cfg, task, out, device=dist.device,
                            bf16=use_bf16(cfg.bf16, dist.device), main=dist.main,
                            log=log if dist.main else lambda s: None)
    return cfg, rates, (metrics, examples)


def _train_runs(cfg: SweepConfig, task: TaskData, out: Path, runs: list, base_eval: tuple, *,
                rates: dict[int, float], dist, progress: bool,
                log: Callable[[str], None]) -> list[dict]:
    from tqdm.auto import tqdm

    if dist.main and (mixed := precision_line(out, cfg.runs(), use_bf16(cfg.bf16, dist.device))):
        log(mixed)                      # read and said once, by the process that logs
    manifests = []
    bar = tqdm(runs, desc="sweep", unit="run", disable=not (progress and dist.main),
               file=sys.stderr)
    for run in bar:
        run_dir = out / run.name
        done = finished_manifest(run_dir)
        if done is None:
            run_cfg = replace(cfg, lr_lora=rate_for(run.rank, rates)) \
                if rates and run.method == "lora" else cfg
            claim_run_dir(run_dir, run_config_text(run_cfg, run))    # made, or the same config
            with run_lock(run_dir) if dist.main else contextlib.nullcontext():
                done = finished_manifest(run_dir)     # another process may have finished it
                if done is None:
                    done = train_run(run_cfg, task, run_dir, run, dist=dist,
                                     base_eval=base_eval[0],
                                     base_examples=base_eval[1], progress=progress)
                    if dist.main:
                        log(summary_line(done))
        elif dist.main:
            log(f"{run.name:<14} finished earlier, skipped")
        manifests.append(done)
    bar.close()
    leave_dist()
    return manifests


def precision_line(out: Path, runs: list, bf16: bool) -> str | None:
    """A line saying that the sweep at ``out`` will mix precisions: some of its finished runs
    trained in another precision than the one (``bf16`` autocast or float32) its runs left
    would train in here. None when they agree or no run is left.

    A sweep resumed on another machine can: the profiles leave ``bf16`` to the chip. The
    runs' numbers then differ as another seed's would (figures/README: bf16 vs float32).
    """
    done = [m for run in runs if (m := finished_manifest(out / run.name)) is not None]
    other = sum(bool(m.get("bf16_autocast")) != bf16 for m in done)
    left = len(runs) - len(done)
    if not left or not other:
        return None
    here, there = ("bf16 autocast", "float32") if bf16 else ("float32", "bf16 autocast")
    return (f"sweep {out}: {other} of its finished runs trained in {there} and this machine "
            f"trains the {left} left in {here}, so the sweep mixes precisions; set bf16 in "
            f"its config to pin one")


def grid_table(manifests: list[dict]):
    """A DataFrame of the runs' held-out metrics before and after training."""
    import pandas as pd

    rows = []
    for m in manifests:
        if not m:
            continue
        rows.append({"run": m["run"], "method": m["method"], "rank": m["rank"], "seed": m["seed"],
                     **{f"before_{k}": v for k, v in m["eval_before"].items()},
                     **{f"after_{k}": v for k, v in m["eval_after"].items()},
                     "wall_time_s": m["wall_time_s"], "trainable_params": m["trainable_params"]})
    return pd.DataFrame(rows)
