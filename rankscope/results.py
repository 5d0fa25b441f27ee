"""A results folder: the CSV tables that compare/truncate write and figures/report read."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import InputError
from .io import atomic_write_json, atomic_write_text
from .provenance import provenance

TABLES = ("metrics", "modules", "spectra", "subspace", "subspace_grid", "convergence", "relation",
          "intruders", "truncation", "truncation_summary")


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


def write_verdict(out: Path) -> str:
    """Build the verdict from the tables in ``out`` and write ``verdict.md``/``verdict.json``."""
    from .verdict import verdict

    frames = load_tables(out)
    if "metrics" not in frames:
        raise InputError(f"{out} has no metrics.csv: run `rankscope compare` first")
    text, evidence = verdict(frames)
    atomic_write_text(out / "verdict.md", text)
    atomic_write_json(out / "verdict.json", evidence)
    return text
