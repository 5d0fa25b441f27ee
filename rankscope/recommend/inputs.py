"""What a recommendation reads from a sweep: its finished runs, of one model and task."""
from __future__ import annotations

from pathlib import Path


def check_runs(runs: str | Path) -> list:
    """The runs' DeltaSets, once they are known to be finished and of one model and task.

    Raises:
        InputError: no finished runs, or runs of different models or tasks mixed together.
    """
    from rankscope.analysis.deltas import check_same_setup, from_runs

    sets = from_runs(runs)
    check_same_setup(sets)
    return sets
