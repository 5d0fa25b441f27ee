"""The planted-rank task: a teacher = base model + ΔW* of a known rank, and a student that learns it.

The control of the hypothesis (docs/science.md, "A verdict that can fail"): on every LoRA target
of the base model (MiniLM's ``query``/``value``, SmolLM2's ``q_proj``/``v_proj``) the teacher
adds

    ΔW* = U · diag(s, …, s) · Vᵀ,   U (d_out, r), V (d_in, r) seeded Haar frames,
    s = planted_scale · ‖W₀‖_F / √r,   so rank ΔW* = r exactly and ‖ΔW*‖_F = planted_scale · ‖W₀‖_F.

Equal singular values make every planted direction equally worth learning: no direction hides
below another, so a rank read off the student is r, not r's largest few. The directions are drawn
from ``planted_seed`` alone (one generator, the modules in model order), not from a run's seed:
every run of a sweep, the truncation test and ``recommend --validate`` distil the same teacher.

The student starts from the base model and learns to match the teacher on the ``news``
paragraphs; the distillation loss (``rankscope.train.objective.row_losses``) is the task's
held-out ``loss``: the MSE of the backbone's final hidden states, averaged over hidden units and
over the attended tokens. Teacher and student are the bare backbone (an encoder without its
pooler, a causal LM without its head):

* an encoder's final hidden states are its output (a sentence embedding is their mean), and
  every token gives a dense target of d_model numbers, where a pooled embedding would give one
  vector per row: the most signal per forward pass.
* a causal LM's head is a fixed linear map of its final (normed) hidden state, so a student
  that matches those matches the teacher's next-token distribution exactly. The KL of the two
  distributions was the first choice; measured on SmolLM2's first block (8 × 64 tokens, two CPU
  cores shared with another job) a KL step took 4.6 s and a hidden-state step 1.7 s: the
  49,152-way head and softmax, run for both models, were two-thirds of the step.

The loss is 0 exactly when the student computes the teacher's function and > 0 otherwise.
Student and teacher run with every dropout rate 0 (``model_setup.load_task_model``).

Measured (2-block MiniLM slice, planted rank 4 on query/value, batch 8 × 128 tokens, warm-up
10% + cosine, held-out 32 blocks; 2 CPU cores, ~0.4 s a step when not shared):

* planted_scale 0.2, lr_full 3e-4, 400 steps: full fine-tuning removes 91.6% of the held-out
  loss (0.00376 → 0.00032; 93.4% with ``full_scope: linear``) and has plateaued: the last fifth
  makes 0.3% of the gain (``late_gain_share`` 0.003); ~160 s a run. LoRA r = 4 at lr 1e-3:
  95.5%. 200 steps at 3e-4 remove 88%; lr 1e-4 removes 83% by step 125 of 200; lr 1e-3 (on
  every parameter) stalls at 13%.
* planted_scale 0.1, same run: 12% removed after 100 steps (the planted signal is the size of
  the optimiser's own drift at that rate), 85% after 300. planted_scale 0.4: 91.0%, the 0.2 curve.

The function is learned before the matrix: full fine-tuning's ΔW on a target shows the planted
rank as a gap (σ₅/σ₄ ≈ 0.3, its top-4 subspace at φ 0.5–0.8 with ΔW*'s, chance ≈ 0.01), but
only ~30% of its energy lies in ΔW*'s subspace and its k₉₀ is 12–59: Haar directions that the
news text barely excites need not be learned to match the teacher's outputs.
"""
from __future__ import annotations

import math

import torch

from rankscope.errors import InputError
from rankscope.linalg.subspace import random_orthonormal
from rankscope.store.runs import tensor_hash
from rankscope.train.models import HEADS, LinearInfo, find_linear_modules, is_target, linear_weight


def planted_ranks(model, targets: tuple[str, ...], planted_rank: int | dict) -> dict[str, int]:
    """The rank of ΔW* in each module it is planted in: every module that ``targets`` names.

    Args:
        model: the base model (the student's class).
        targets: the sweep's LoRA targets (module kinds), or ("all-linear",).
        planted_rank: one rank for every module, or {module kind: rank}; a kind matches a
            module whose name ends with it, the longest matching kind wins.
    Returns:
        {module name: r}, in model order.
    Raises:
        InputError: naming planted_rank: a target module with no rank in the mapping, a kind
            that names no target module, or a rank above a module's min(d_out, d_in).
    """
    infos = [i for i in find_linear_modules(model) if _is_target(i, targets)]
    kinds = planted_rank if isinstance(planted_rank, dict) else None
    out = {}
    for info in infos:
        if kinds is None:
            kind, r = None, planted_rank
        else:
            hits = [k for k in kinds if is_target(info.name, k)]
            if not hits:
                raise InputError(f"planted_rank: no rank for target module {info.name} (give "
                                 f"one for its kind, {info.module!r})")
            kind = max(hits, key=len)
            r = kinds[kind]
        if r > min(info.d_out, info.d_in):
            raise InputError(f"planted_rank: {r} is larger than min(d_out, d_in) = "
                             f"{min(info.d_out, info.d_in)} of {kind or info.module}")
        out[info.name] = r
    unused = [k for k in (kinds or {}) if not any(is_target(n, k) for n in out)]
    if unused:
        raise InputError(f"planted_rank: {unused[0]!r} names no target module (targets: "
                         f"{', '.join(targets)})")
    return out


def _is_target(info: LinearInfo, targets: tuple[str, ...]) -> bool:
    if tuple(targets) == ("all-linear",):
        return not HEADS & set(info.name.split("."))
    return any(is_target(info.name, t) for t in targets)


def planted_update(d_out: int, d_in: int, rank: int, *, fro: float,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW* = B·A of rank exactly ``rank``, equal singular values and Frobenius norm ``fro``.

    B = U·s (d_out, r) and A = Vᵀ (r, d_in) with U, V Haar frames, s = fro / √r.

    Returns:
        (B, A) float64.
    Raises:
        InputError: rank outside [1, min(d_out, d_in)].
    """
    u = random_orthonormal(d_out, rank, generator=generator)      # (d_out, r)
    v = random_orthonormal(d_in, rank, generator=generator)       # (d_in, r)
    return u * (fro / math.sqrt(rank)), v.T.contiguous()


def planted_factors(model, ranks: dict[str, int], *, scale: float,
                    seed: int) -> dict[str, torch.Tensor]:
    """The factors of every module's ΔW*, drawn from ``seed`` in the order of ``ranks``.

    Args:
        model: the base model; ‖W₀‖_F of each module is read from it.
        ranks: ``planted_ranks``' {module: r}.
        scale: ‖ΔW*‖_F / ‖W₀‖_F.
    Returns:
        {"<module>.lora_A": (r, d_in), "<module>.lora_B": (d_out, r), "<module>.scaling": 1.0},
        float32, ΔW* = scaling · B @ A: a run folder's LoRA layout, so anything that reads
        a LoRA run's update reads this one.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, r in ranks.items():
        w0 = linear_weight(model.get_submodule(name)).detach().double()
        b, a = planted_update(*w0.shape, r, fro=scale * float(torch.linalg.norm(w0)),
                              generator=gen)
        out.update({f"{name}.lora_A": a.float(), f"{name}.lora_B": b.float(),
                    f"{name}.scaling": torch.tensor(1.0)})
    return out


@torch.no_grad()
def add_planted(model, factors: dict[str, torch.Tensor]) -> None:
    """W₀ += scaling · B @ A in every module of ``factors``, in place (the product in float64)."""
    for key in [k for k in factors if k.endswith(".lora_A")]:
        name = key.removesuffix(".lora_A")
        w = linear_weight(model.get_submodule(name))
        delta = float(factors[f"{name}.scaling"]) * (factors[f"{name}.lora_B"].double()
                                                     @ factors[key].double())
        w.copy_((w.double() + delta).to(w.dtype))


class Teacher:
    """The teacher's model (base + ΔW*), its factors and their hash; it never trains.

    ``meta`` records how ΔW* was drawn (planted_rank, planted_scale, planted_seed).
    """

    def __init__(self, model, factors: dict[str, torch.Tensor], *, meta: dict | None = None):
        self.model = model.eval().requires_grad_(False)
        self.factors = factors
        self.hash = tensor_hash(factors)
        self.meta = dict(meta or {})

    @torch.no_grad()
    def outputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone's final hidden states (B, L, H), float32, on the batch's device."""
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state.float()


class DistillSplit(dict):
    """One side of a planted task's split: its tensors, and the teacher whose outputs are its
    targets (so ``evaluate(model, task.eval, …)`` needs nothing more than any task's split)."""

    def __init__(self, tensors: dict[str, torch.Tensor], teacher: Teacher):
        super().__init__(tensors)
        self.teacher = teacher
