"""What a finished run saves of its model: ΔW of full fine-tuning, or LoRA's factors.

The tensors go to the run folder's ``updates.safetensors`` (``rankscope.store.runs``): full
"<module>.delta" (d_out, d_in); LoRA "<module>.lora_A" (r, d_in), "<module>.lora_B" (d_out, r)
and "<module>.scaling", with ΔW = scaling · B @ A, and "<module>.lora_A0" (r, d_in), A at
initialisation (``lora_a`` of the fresh adapter).
"""
from __future__ import annotations

import torch

from rankscope.train.models import find_linear_modules, linear_weight, load_backbone, match_name


def full_updates(model, base_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ΔW = W_ft − W_0 (float32) for every linear module of the pretrained backbone, and the
    final values of every other parameter (norms, biases, embeddings, a new head).

    The second dict lets a truncation test rebuild the fine-tuned model exactly; ΔW is defined
    only for linear weights that the pretrained checkpoint has (a new head is not an update).

    Args:
        model: the fine-tuned model (not a DDP wrapper).
        base_name: the model name it was fine-tuned from, to reload W_0.
    Returns:
        ({"<module>.delta": (d_out, d_in)}, {"<parameter>": tensor}), float32 on the CPU.
    """
    base = load_backbone(base_name)
    base_infos = {i.name: i for i in find_linear_modules(base)}
    deltas, covered = {}, set()
    for info in find_linear_modules(model):
        hit = match_name(info.name, base_infos.keys())
        if hit is None:
            continue
        mod = model.get_submodule(info.name)
        w1 = linear_weight(mod).detach().float().cpu()
        w0 = linear_weight(base.get_submodule(hit)).detach().float()
        deltas[f"{info.name}.delta"] = w1 - w0
        covered.add(id(mod.weight))
    others = {n: p.detach().float().cpu() for n, p in model.named_parameters()
              if id(p) not in covered}
    return deltas, others


def lora_updates(peft_model, *, initial_a: dict[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """The LoRA factors A (r, d_in), B (d_out, r) and scaling of every adapted module.

    Module names drop peft's ``base_model.model.`` prefix, so they match the full run's.

    Args:
        initial_a: {module: A₀ (r, d_in)}, A at initialisation; saved as "<module>.lora_A0".
    """
    out = {}
    for key, mod in _adapted(peft_model):
        out[f"{key}.lora_A"] = mod.lora_A["default"].weight.detach().float().cpu()
        out[f"{key}.lora_B"] = mod.lora_B["default"].weight.detach().float().cpu()
        out[f"{key}.scaling"] = torch.tensor(float(mod.scaling["default"]))
        if initial_a is not None:
            out[f"{key}.lora_A0"] = initial_a[key].float().cpu()
    return out


def lora_a(peft_model) -> dict[str, torch.Tensor]:
    """{module: a float32 CPU copy of A (r, d_in)}: of a fresh adapter, A₀."""
    return {key: mod.lora_A["default"].weight.detach().float().cpu().clone()
            for key, mod in _adapted(peft_model)}


def _adapted(peft_model):
    """(module name without peft's ``base_model.model.`` prefix, LoRA layer) of each adapted
    module."""
    prefix = "base_model.model."
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            yield (name.removeprefix(prefix)), mod
