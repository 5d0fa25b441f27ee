"""A results folder: the CSV tables that compare/truncate write and figures/report read."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from rankscope.errors import InputError
from rankscope.store.atomic import atomic_write_json, atomic_write_text
from rankscope.store.provenance import provenance

VALIDATED = "validate/configs.json"      # the LoRA configs that validate.csv tested
# The version of what the stages compute into a results folder: part of every stage's stamp
# (``pipeline.stages``), so a folder computed by a rankscope that wrote other tables (before
# ``snapshots.csv``, say) is redone once rather than read as up to date. Bump it when a stage
# adds a table or changes how one is computed.
RESULTS_VERSION = 3
TABLES = ("metrics", "examples", "modules", "spectra", "subspace", "subspace_grid", "convergence",
          "relation", "intruders", "truncation", "truncation_summary", "snapshots")


def prepare_out(out: str | Path) -> Path:
    """Create a results folder (it may already hold other tables of the same sweep).

    Raises:
        InputError: ``out`` is a file or cannot be created.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder {out}: {e.strerror}") from None
    return out


def check_same_sweep(runs: str | Path, out: str | Path) -> None:
    """Refuse a results folder whose tables were computed from another (existing) sweep.

    Raises:
        InputError: ``out/manifest.json`` records another sweep folder that still exists.
    """
    given = recorded_runs(out)
    if given and Path(given).exists() and Path(given).resolve() != Path(runs).resolve():
        raise InputError(f"results folder {out} holds the tables of {given}, not of {runs}; "
                         "use another --out")


def recorded_runs(out: str | Path) -> str | None:
    """The sweep folder a results folder's tables were computed from, if it records one."""
    import json

    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (ValueError, OSError):
        return None
    runs = doc.get("inputs", {}).get("runs") if isinstance(doc, dict) else None
    return runs if isinstance(runs, str) else None


def check_results_out(out: str | Path, runs: str | Path, *, overwrite: bool = False) -> bool:
    """Check, before any work, that ``out`` may take the tables of sweep ``runs``.

    A results folder is shared by compare, truncate, recommend and report of one sweep, so a
    folder holding this sweep's results is kept (its other tables stay). Any other content
    (files that are not rankscope results, or the results of another sweep) is refused
    unless ``overwrite``, and then replaced whole.

    Returns:
        True when ``out`` holds this sweep's results and is to be updated in place; False
        when it is to be written from scratch (it is missing, empty, or ``overwrite``).
    Raises:
        InputError: ``out`` is a file; other content without ``overwrite``; a parent that
            cannot be created or written.
    """
    from rankscope.store.atomic import check_out_dir

    out = check_out_dir(out, overwrite=True)
    if not out.is_dir() or not any(out.iterdir()):
        return False
    given = recorded_runs(out)
    same = given is not None and (not Path(given).exists()
                                  or Path(given).resolve() == Path(runs).resolve())
    if same:
        return True
    if not overwrite:
        what = f"the tables of {given}" if given else "other content"
        raise InputError(f"output folder {out} holds {what}, not results of {runs} "
                         "(use --overwrite to replace it, or another --out)")
    return False


def save_tables(out: Path, frames: dict[str, pd.DataFrame], *, inputs: dict) -> None:
    """Write each table as ``<name>.csv`` atomically, and record them in ``manifest.json``."""
    for name, df in frames.items():
        atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    manifest_path = out / "manifest.json"
    import json

    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    tables = sorted(set(old.get("tables", [])) | set(frames))
    atomic_write_json(manifest_path, {"inputs": {**old.get("inputs", {}), **inputs},
                                      "tables": tables, **provenance()})


def load_tables(out: str | Path) -> dict[str, pd.DataFrame]:
    """Every known table present in a results folder.

    Raises:
        InputError: the folder is missing or holds none of the tables.
    """
    out = Path(out)
    if not out.is_dir():
        raise InputError(f"missing results folder {out}")
    frames = {}
    for name in TABLES:
        path = out / f"{name}.csv"
        if path.exists():
            try:
                frames[name] = pd.read_csv(path)
            except pd.errors.EmptyDataError:    # an analysis with no rows (e.g. no rank pairs)
                frames[name] = pd.DataFrame()
            except (pd.errors.ParserError, UnicodeDecodeError) as e:
                raise InputError(f"corrupt table {path}: {e}") from None
    if not frames:
        raise InputError(f"{out} holds no rankscope results (run `rankscope compare` first)")
    return frames
