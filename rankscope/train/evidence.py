"""A run's training evidence (docs/science.md, "Training evidence"): is there anything to measure?

Its manifest records the held-out curve (``eval_history``), the share of the held-out gain made
in the last fifth of training (``late_gain_share``: a converged run makes little of it there),
where the "last fifth" is of the learning-rate schedule's mass, not of its steps: the last fifth
of a cosine schedule's steps applies ~1% of its rate (0.5·(0.2 − sin(0.8π)/π) ≈ 0.006 of 0.5),
so a gate on those steps would pass any run, trained or not,
how far each LoRA A moved from its initialisation (``a_moved``: below ~0.5, A's row space is
still mostly its random start) and ‖ΔW‖_F of each module (``delta_fro``).
"""
from __future__ import annotations

import math

import torch

from rankscope.train.loop import lr_lambda

LATE = 0.8              # the held-out evaluation that splits off the last fifth of training


def late_step(steps: int, *, warmup: float = 0.0, schedule: str = "constant") -> int:
    """The step by which the schedule has applied the share ``LATE`` of its learning-rate mass.

    The mass after step s is the sum of the rate multipliers of steps 1 … s (``lr_lambda``); the
    step returned is the one whose mass is nearest 80% of the run's (a tie goes to the later).
    A constant rate gives the step nearest 80% of ``steps`` (halves round up); 200 steps of
    warm-up 0.1 + cosine give step 103, not 160.

    Returns:
        A step in [1, steps].
    """
    mass = [0.0]
    for i in range(steps):
        mass.append(mass[-1] + lr_lambda(i, total=steps, warmup=warmup, schedule=schedule))
    target = LATE * mass[-1]
    return min(range(1, steps + 1), key=lambda s: (abs(mass[s] - target), -s))


def eval_history(before: dict[str, float], rows: list[dict]) -> list[dict]:
    """The held-out evaluations of a run in step order, the base model's first (step 0).

    Args:
        before: the held-out metrics at step 0 (the sweep's base evaluation).
        rows: the run's metric rows (``metrics.jsonl``); those of kind "eval" are read.
    Returns:
        [{"step": 0, **before}, {"step": s, <metric>: value, …}, …], one entry per step.
    """
    history = {0: {"step": 0, **before}}
    for row in rows:
        if row.get("kind") == "eval":
            history[row["step"]] = {"step": row["step"],
                                    **{k: v for k, v in row.items() if k not in ("step", "kind")}}
    return [history[s] for s in sorted(history)]


def late_gain_share(history: list[dict], *, late: int, steps: int) -> float | None:
    """(m_80 → m_end) / (m_0 → m_end), in the direction of improvement.

    m is accuracy when the evaluations have it (higher is better), else loss (lower is
    better); m_80 is the evaluation at step ``late`` (the run's ``late_step``). 0 means no gain was
    made in the last fifth, 1 all of it; a value below 0 says the last fifth lost some of the gain.

    Returns:
        The share, or None: no gain (m_end no better than m_0), or no evaluation at step 0,
        at the 80% step or at the last.
    """
    by_step = {h["step"]: h for h in history}
    if not {0, late, steps} <= set(by_step):
        return None
    metric = "accuracy" if "accuracy" in by_step[steps] else "loss"
    sign = 1.0 if metric == "accuracy" else -1.0             # + for the improving direction
    m0, m80, m_end = (float(by_step[s][metric]) for s in (0, late, steps))
    total = sign * (m_end - m0)
    if not total > 0:
        return None
    return sign * (m_end - m80) / total


def late_train_rise(rows: list[dict], *, steps: int) -> float | None:
    """How much the training loss rose over the last fifth of the steps, relative to the fifth
    before it: mean(loss of the last fifth) / mean(loss of the fifth before) − 1.

    Above 0 means training got worse at its end, which a converging run does not do under a
    decaying rate: the instability gate of ``analysis.verdict`` reads it. Each mean is over
    ~a fifth of the steps, so one noisy batch moves it little.

    Args:
        rows: the run's metric rows (``kind == "train"`` rows carry ``step`` and ``loss``).
    Returns:
        The relative rise, or None when either fifth has no finite loss (fewer than 10 steps).
    """
    fifth = steps // 5
    if fifth < 2:
        return None
    loss = {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}

    def mean(lo: int, hi: int) -> float | None:
        vals = [loss[s] for s in range(lo, hi) if s in loss and math.isfinite(loss[s])]
        return sum(vals) / len(vals) if vals else None

    before, last = mean(steps - 2 * fifth + 1, steps - fifth + 1), mean(steps - fifth + 1, steps + 1)
    if before is None or last is None or before <= 0:
        return None
    return last / before - 1


def a_moved(updates: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖A − A₀‖_F / ‖A₀‖_F of every LoRA module that has "<module>.lora_A0" in ``updates``."""
    out = {}
    for key, a0 in updates.items():
        if key.endswith(".lora_A0"):
            name = key.removesuffix(".lora_A0")
            a0, a = a0.double(), updates[f"{name}.lora_A"].double()
            out[name] = float(torch.linalg.norm(a - a0) / torch.linalg.norm(a0))
    return out


def delta_fro(updates: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖ΔW‖_F of every module: of "<module>.delta", or ‖s·B·A‖_F of LoRA's factors.

    ‖BA‖_F² = tr(AᵀBᵀBA) = Σ (BᵀB) ∘ (AAᵀ): two r × r products, never the d_out × d_in ΔW.
    """
    out = {}
    for key, t in updates.items():
        if key.endswith(".delta"):
            out[key.removesuffix(".delta")] = float(torch.linalg.norm(t.double()))
        elif key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            a, b = t.double(), updates[f"{name}.lora_B"].double()       # (r, d_in), (d_out, r)
            sq = float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0.0))
            out[name] = abs(float(updates[f"{name}.scaling"])) * math.sqrt(sq)
    return out
