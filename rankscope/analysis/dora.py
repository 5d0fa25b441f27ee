"""DoRA's effective weight update (Liu et al. 2024), as peft's ``DoraLinearLayer`` merges it.

DoRA splits a weight into a magnitude m (d_out,) and a direction: the merged weight is
W' = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_r, the norm taken over each output row (peft's
``get_weight_norm``: ``torch.linalg.norm(weight, dim=1)`` of the (d_out, d_in) weight). Its
update ΔW = W' − W₀ is not s·B·A and needs W₀, so it is formed densely, one module at a time,
and analysed as a full update under its own method label "dora".
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from rankscope.analysis.deltas import DeltaSet, ModuleDelta, adapter_tensors, from_adapter, \
    read_adapter_config
from rankscope.errors import InputError
from rankscope.linalg.spectra import check_finite
from rankscope.train.models import WeightReader

METHOD = "dora"
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_magnitude_vector(?:\.[^.]+)?"
                            r"(?:\.weight)?$")


def magnitude_vectors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """{module name: m (d_out,)} of every ``lora_magnitude_vector`` in an adapter's tensors."""
    out = {}
    for key, t in tensors.items():
        hit = _MAGNITUDE_KEY.match(key)
        if hit:
            out[hit.group(1)] = t
    return out


def dora_update(W0: Tensor, B: Tensor, A: Tensor, *, scale: float, magnitude: Tensor,
                name: str = "module") -> Tensor:
    """ΔW = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖_r − W₀, computed in float64.

    Args:
        W0: (d_out, d_in) the base weight, in y = W x orientation.
        B: (d_out, r); A: (r, d_in); scale: s.
        magnitude: (d_out,) DoRA's m.
        name: the module, for error messages.

    Returns:
        (d_out, d_in) float32 ΔW.

    Raises:
        InputError: shapes that do not chain, NaN/Inf, or a row of W₀ + s·B·A with zero norm.
    """
    d_out, d_in = W0.shape
    if B.shape[0] != d_out or A.shape[1] != d_in or B.shape[1] != A.shape[0]:
        raise InputError(f"DoRA {name}: factors {tuple(B.shape)} @ {tuple(A.shape)} do not fit "
                         f"its base weight {tuple(W0.shape)}")
    if tuple(magnitude.shape) != (d_out,):
        raise InputError(f"DoRA {name}: magnitude of shape {tuple(magnitude.shape)}, "
                         f"expected ({d_out},)")
    check_finite(magnitude, what=f"lora_magnitude_vector of {name}")
    w0 = W0.double()
    direction = w0 + scale * (B.double() @ A.double())           # (d_out, d_in)
    norm = torch.linalg.vector_norm(direction, dim=1)             # (d_out,)
    if not bool((norm > 0).all()):
        raise InputError(f"DoRA {name}: a row of W0 + s·B·A is zero, so its direction is undefined")
    return ((magnitude.double() / norm)[:, None] * direction - w0).float()


def from_peft_adapter(adapter_dir: str | Path, *, base: str | Path | None = None) -> DeltaSet:
    """A PEFT adapter's updates: a LoRA adapter's factors (``deltas.from_adapter``), or a DoRA
    adapter's effective update (``from_dora_adapter``), as its config says.

    Raises:
        InputError: a missing folder; see those two functions.
    """
    if not Path(adapter_dir).is_dir():
        raise InputError(f"missing adapter folder {adapter_dir}")
    if read_adapter_config(Path(adapter_dir), allow_dora=True).get("use_dora"):
        return from_dora_adapter(adapter_dir, base=base)
    return from_adapter(adapter_dir, base=base)


def from_dora_adapter(adapter_dir: str | Path, *, base: str | Path | None) -> DeltaSet:
    """The effective update ``dora_update`` of every module of a PEFT DoRA adapter.

    Each module's W₀ is read from ``base`` when the stream reaches it (from its safetensors
    when it has them, else from the model loaded whole), and its dense ΔW formed then.

    Raises:
        InputError: no ``base``; see ``deltas.from_adapter``; a module without its magnitude
            vector; a module the base model lacks; see ``dora_update``.
    """
    if base is None:
        raise InputError(f"adapter {adapter_dir} is DoRA: its update needs the base weights W0, "
                         "give --base")
    lora = from_adapter(adapter_dir, base=base, allow_dora=True)
    factors = list(lora)
    mags = magnitude_vectors(adapter_tensors(Path(adapter_dir)))
    for d in factors:
        if d.name not in mags:
            raise InputError(f"DoRA adapter {adapter_dir}: module {d.name} has no "
                             "lora_magnitude_vector")
    weight = WeightReader(base).weight

    def load() -> Iterator[ModuleDelta]:
        for d in factors:
            delta = dora_update(weight(d.name), d.B, d.A, scale=d.scale, magnitude=mags[d.name],
                                name=d.name)
            yield ModuleDelta(d.name, d.layer, d.module, d.d_out, d.d_in, dense=delta)

    meta = {**lora.meta, "source": "peft-dora-adapter"}
    return DeltaSet(lora.run, METHOD, lora.rank, None, meta, load, len(factors))
