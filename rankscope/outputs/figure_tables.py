"""Reading a figure's results tables: the pieces every figure builder shares.

``results`` = {sweep label: {table name: DataFrame}} (``store.results.load_tables``); a
figure's data is one DataFrame whose ``plot`` and ``panel`` columns come first.
"""
from __future__ import annotations

import pandas as pd

from rankscope.errors import InputError


def one_sweep(results: dict) -> dict[str, pd.DataFrame]:
    """The tables of the first sweep a figure reads."""
    return next(iter(results.values()))


def need_table(tables: dict, name: str, what: str) -> pd.DataFrame:
    """The table ``name``; raises InputError naming ``what`` needs it when missing or empty."""
    df = tables.get(name)
    if df is None or df.empty:
        raise InputError(f"{what} needs the {name} table, which the results lack or is empty")
    return df


def mid_layer(df: pd.DataFrame, layer: int | None) -> int:
    """``layer`` when ``df`` has it (else InputError), or the middle of its layers."""
    layers = sorted(int(x) for x in df["layer"].dropna().unique())
    if layer is None:
        return layers[len(layers) // 2]
    if layer not in layers:
        raise InputError(f"layer {layer} is not in the results (layers: {layers})")
    return layer


def panels(rows: list[pd.DataFrame]) -> pd.DataFrame:
    """The rows of every panel, ``plot`` and ``panel`` first."""
    front = ["plot", "panel"]
    df = pd.concat(rows, ignore_index=True)
    return df[front + [c for c in df.columns if c not in front]]
