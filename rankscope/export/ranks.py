"""The rank an export gives each module, and the balanced LoRA factors of a truncated update.

Pure functions of tensors and plain values: no model, file or print (``read_recommendation``
aside, which only reads a JSON file).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rankscope.analysis.deltas import pattern_value
from rankscope.errors import InputError
from rankscope.store.runs import read_json_object
from rankscope.train.models import is_target


@dataclass(frozen=True)
class RankRule:
    """How an export chooses each module's rank k: exactly one of the three ways.

    Args:
        rank: one k for every module (``--rank``), 1 ≤ k ≤ min(d_out, d_in).
        energy: τ in (0, 1] (``--energy``): per module the smallest k whose top-k singular
            values hold a share τ of ‖ΔW‖_F² (``spectra.rank_at_energy``).
        config: a PEFT LoRA config dict (``--from``, e.g. ``rankscope recommend``'s
            ``lora_config.json``): the modules its ``target_modules`` name, at the rank its
            ``rank_pattern`` or ``r`` gives them; its α is not used (an export's scale is 1).
        config_path: where ``config`` was read from, for messages and the record.
    Raises:
        InputError: none or several of the three, a rank below 1, τ outside (0, 1].
    """

    rank: int | None = None
    energy: float | None = None
    config: dict | None = None
    config_path: str | None = None

    def __post_init__(self):
        given = [flag for flag, v in (("--rank", self.rank), ("--energy", self.energy),
                                      ("--from", self.config)) if v is not None]
        if len(given) != 1:
            raise InputError("give one of --rank, --energy or --from" if not given else
                             f"give one of --rank, --energy or --from, not {' and '.join(given)}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise InputError(f"--rank must be an integer >= 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:   # NaN fails too
            raise InputError(f"--energy must be in (0, 1], got {self.energy}")

    def describe(self) -> dict:
        """The rule as export.json records it."""
        if self.rank is not None:
            return {"rank": self.rank}
        if self.energy is not None:
            return {"energy": self.energy}
        return {"from": self.config_path, "r": self.config["r"],
                "rank_pattern": self.config.get("rank_pattern") or {}}


def read_recommendation(path: str | Path) -> dict:
    """A PEFT LoRA config dict from a JSON file, checked for what an export reads of it.

    Raises:
        InputError: a missing or corrupt file; ``r`` or a ``rank_pattern`` value that is not
            an integer >= 1; ``target_modules`` missing or neither a string nor a list of them.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing recommendation {path}")
    cfg = read_json_object(path, "recommendation")

    def whole(value, what):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"recommendation {path}: {what} must be an integer >= 1, got {value!r}")

    whole(cfg.get("r"), "r")
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise InputError(f"recommendation {path}: rank_pattern must be an object")
    for key, value in pattern.items():
        whole(value, f"rank_pattern[{key!r}]")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or isinstance(targets, list)
            and targets and all(isinstance(t, str) for t in targets)):
        raise InputError(f"recommendation {path}: target_modules must name modules, got {targets!r}")
    return cfg


def targeted(config: dict, name: str) -> bool:
    """Whether a PEFT config's ``target_modules`` adapts module ``name``, as PEFT reads it: a
    list names a module or its last dotted parts; a string is ``all-linear`` or a regex that
    must match the whole name."""
    targets = config["target_modules"]
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    return any(is_target(name, t) for t in targets)


def planned_rank(rule: RankRule, name: str, *, shape: tuple[int, int],
                 source_rank: int | None) -> int | None:
    """Module ``name``'s rank under ``rule`` before its spectrum is known.

    Args:
        rule: the rank rule.
        name: the module's name in the model the adapter is for.
        shape: (d_out, d_in) of its weight.
        source_rank: its LoRA rank r when the source is an adapter (a resize can only lower
            it), else None.
    Returns:
        k ≥ 1; 0 for a module a ``--from`` config leaves out; None under ``--energy``
        (``spectra.rank_at_energy`` decides from the spectrum).
    Raises:
        InputError: k above min(d_out, d_in), or above the source's LoRA rank.
    """
    if rule.energy is not None:
        return None
    if rule.rank is not None:
        k, flag = rule.rank, "--rank"
    elif not targeted(rule.config, name):
        return 0
    else:
        k = int(pattern_value(rule.config.get("rank_pattern"), name, rule.config["r"]))
        flag = f"--from {rule.config_path}"
    if k > min(shape):
        raise InputError(f"{flag} asks rank {k} of {name}, above its min(d_out, d_in) = {min(shape)}")
    if source_rank is not None and k > source_rank:
        raise InputError(f"{flag} asks rank {k} of {name}, above its LoRA rank {source_rank}: "
                         "a resize can only lower the rank")
    return k


def retained_energy(S: torch.Tensor, k: int) -> float | None:
    """Σ_{i≤k} σ_i² / Σ_i σ_i², the share of ‖ΔW‖_F² that trunc_k keeps; None for a zero ΔW.

    S is the whole spectrum, descending; it is scaled by σ_max first so σ² cannot overflow.
    """
    s = S.detach().double()
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    e = (s / s[0]) ** 2
    return float(e[:k].sum() / e.sum())


def balanced_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                     k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors of trunc_k(ΔW) with the singular values split evenly between them.

    B = U_k diag(S_k)^½ and A = diag(S_k)^½ V_kᵀ, so B·A = U_k diag(S_k) V_kᵀ = trunc_k(ΔW)
    (``spectra.truncate``) at scale 1, and BᵀB = A Aᵀ = diag(S_k): neither factor carries the
    update's magnitude alone, as a trained LoRA pair tends not to.

    Args:
        U: (d_out, m), S: (m,) descending, Vh: (m, d_in): the SVD of ΔW.
        k: 1 ≤ k ≤ m.
    Returns:
        (B (d_out, k), A (k, d_in)), float32 (the dtype of the models they load into).
    Raises:
        InputError: k outside [1, m].
    """
    m = S.shape[0]
    if not 1 <= k <= m:
        raise InputError(f"k={k} is outside [1, {m}] (the number of singular values)")
    root = S[:k].double().sqrt()                                 # (k,)
    B = U[:, :k].double() * root                                 # (d_out, k)
    A = root[:, None] * Vh[:k].double()                          # (k, d_in)
    return B.float().contiguous(), A.float().contiguous()


def lora_params(shape: tuple[int, int], k: int) -> int:
    """Trainable parameters of a rank-k LoRA pair on a (d_out, d_in) weight: k·(d_out + d_in)."""
    return k * (shape[0] + shape[1])

