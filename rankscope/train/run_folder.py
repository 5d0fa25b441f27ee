"""What training writes into a run folder: its config, checkpoints, metrics and updates.

The format is ``rankscope.store.runs``'s. A run folder is claimed with its config before it
trains, holds a resumable ``checkpoint/`` while it trains, and is finished once its outputs
and, last, its manifest are written (``rankscope.train.run``).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from rankscope.errors import InputError
from rankscope.store.atomic import atomic_dir, atomic_write_text
from rankscope.store.runs import RunId
from rankscope.train.config import changed_fields

CKPT = "checkpoint"
ASIDE = f".{CKPT}.old"      # where atomic_dir moves the previous checkpoint during its renames


def run_config_text(cfg, run: RunId) -> str:
    """The YAML a run folder records: what it computes (``cfg``, the SweepConfig's training
    view), and its place in the grid."""
    doc = {"method": run.method, "rank": run.rank, "seed": run.seed,
           "lora_alpha": cfg.lora_alpha(run.rank) if run.method == "lora" else None,
           **cfg.training_view()}
    return yaml.safe_dump(doc, sort_keys=False)


def claim_run_dir(run_dir: Path, text: str) -> None:
    """Create the run folder with its config, or check that an existing one has the same config.

    Raises:
        InputError: the folder holds a run of a different configuration, or is not writable.
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create run folder {run_dir}: {e.strerror}") from None
    path = run_dir / "config.yaml"
    if path.exists():
        diff = changed_fields(yaml.safe_load(path.read_text()), yaml.safe_load(text))
        if diff:
            raise InputError(f"{run_dir} holds a run of another config (differs in: "
                             f"{', '.join(diff)}); use another --out or remove it")
        return
    atomic_write_text(path, text)


def save_checkpoint(run_dir: Path, step: int, params: dict[str, torch.Tensor], opt, sched,
                    metrics: list[dict]) -> None:
    """Save what resuming after ``step`` needs: the trainable parameters (by name), optimizer,
    schedule, RNG state and the metrics so far, replacing the previous checkpoint in one rename.
    """
    params = {n: p.detach().cpu().contiguous() for n, p in params.items()}
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    with atomic_dir(run_dir / CKPT, overwrite=True) as tmp:
        save_file(params, tmp / "trainable.safetensors")
        torch.save({"step": step, "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "metrics": metrics},
                   tmp / "state.pt")


def load_checkpoint(run_dir: Path, params: dict[str, torch.Tensor], opt,
                    sched) -> tuple[int, list[dict]]:
    """Restore the run folder's checkpoint into the trainable ``params`` (by name), ``opt``,
    ``sched`` and the RNG.

    Returns:
        (the step to resume from, the metrics logged so far); (0, []) without a checkpoint.

    Raises:
        InputError: the checkpoint is damaged, foreign (a pickle of anything but tensors,
            numbers, strings and containers is refused unread) or of another run's parameters.
    """
    final = run_dir / CKPT
    if not (final / "state.pt").exists():
        final = run_dir / ASIDE             # killed between atomic_dir's two renames
        if not (final / "state.pt").exists():
            return 0, []
    fix = f"remove {final} to restart this run from step 0"
    # weights_only: tensors, numbers, strings and containers; a pickle that would build any
    # other object (run code) is refused, not executed
    state = _read(final, "state.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True),
                  fix)
    tensors = _read(final, "trainable.safetensors", load_file, fix)
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra or not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        what = (f"lacks {missing[:2]}" if missing else f"has unknown {extra[:2]}" if extra
                else "state.pt lacks " + ", ".join(sorted(_STATE_KEYS - set(state or {}))))
        raise InputError(f"checkpoint {final} does not match this run ({what}); {fix}")
    try:
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])     # dropout on the GPU resumes too
        return int(state["step"]), list(state["metrics"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"checkpoint {final} does not match this run "
                         f"({type(e).__name__}: {_first_line(e)}); {fix}") from None


_STATE_KEYS = {"step", "optim", "sched", "rng", "metrics"}


def _read(final: Path, name: str, read, fix: str):
    """``read(final / name)``; any failure is one line naming the file, its size and the fix."""
    path = final / name
    try:
        return read(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is a damaged or foreign file
        size = path.stat().st_size if path.exists() else 0
        raise InputError(f"checkpoint {final} cannot be read safely ({name}, {size:,} bytes, "
                         f"damaged or foreign: {type(e).__name__}: {_first_line(e)}); {fix}"
                         ) from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:160]


def clear_checkpoint(run_dir: Path) -> None:
    """Remove the checkpoint and any of its leftovers (a temporary or set-aside copy)."""
    for path in [run_dir / CKPT, *run_dir.glob(f".{CKPT}.*")]:
        shutil.rmtree(path, ignore_errors=True)
