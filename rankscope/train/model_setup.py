"""A run's model: the pretrained model with the task's head, checked against the grid, and
made trainable by the run's method (every weight for full fine-tuning, a peft adapter for LoRA).
"""
from __future__ import annotations

import torch

from rankscope.errors import InputError
from rankscope.store.runs import RunId
from rankscope.train.models import find_linear_modules, load_pretrained

HEADS = frozenset({"lm_head", "classifier", "score", "cls"})   # output layers, never adapted


def load_task_model(cfg, *, kind: str, num_labels: int | None):
    """The pretrained model with the head the task needs, float32 on the CPU.

    A new classification head is drawn from ``split_seed``, not from whatever state the global
    generator is in, so the base evaluation and every run start from the same head whatever ran
    before them in the process (other runs, a resume).

    Args:
        cfg: the SweepConfig (model, split_seed).
        kind: "lm", "sft" or "cls"; num_labels: the classes of cls.
    Raises:
        InputError: the model cannot be loaded (see ``load_pretrained``).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "cls":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.split_seed)
            model = load_pretrained(AutoModelForSequenceClassification, cfg.model,
                                    num_labels=num_labels)
    else:
        model = load_pretrained(AutoModelForCausalLM, cfg.model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    return model


def check_targets(model, targets: tuple[str, ...], ranks) -> None:
    """Every target must name linear modules of the model, and every rank fit each of them.

    Raises:
        InputError: a target the model lacks, or a rank above a target's min(d_out, d_in).
    """
    infos = find_linear_modules(model)
    if tuple(targets) == ("all-linear",):       # peft leaves the output layer out of all-linear
        adapted = [i for i in infos if not HEADS & set(i.name.split("."))]
        smallest = min(min(i.d_out, i.d_in) for i in adapted)
        bad = [r for r in ranks if r > smallest]
        if bad:
            raise InputError(f"rank {bad[0]} is larger than min(d_out, d_in) = {smallest} of "
                             "the smallest linear module that all-linear adapts")
        return
    for t in targets:
        hits = [i for i in infos if i.name == t or i.name.endswith("." + t)]
        if not hits:
            kinds = sorted({i.name.rsplit(".", 1)[-1] for i in infos})
            raise InputError(f"target module {t!r} not in the model; it has: {', '.join(kinds)}")
        smallest = min(min(i.d_out, i.d_in) for i in hits)
        bad = [r for r in ranks if r > smallest]
        if bad:
            raise InputError(f"rank {bad[0]} is larger than min(d_out, d_in) = {smallest} of {t}")


def wrap_lora(model, cfg, *, rank: int, kind: str):
    """The model wrapped by peft with a fresh LoRA adapter of rank r (B = 0, A random).

    ``cfg`` is the SweepConfig: targets, α policy and α.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = "all-linear" if tuple(cfg.targets) == ("all-linear",) else list(cfg.targets)
    lcfg = LoraConfig(r=rank, lora_alpha=cfg.lora_alpha(rank), target_modules=targets,
                      lora_dropout=0.0, use_rslora=cfg.alpha_policy == "rslora",
                      task_type=TaskType.SEQ_CLS if kind == "cls" else TaskType.CAUSAL_LM)
    return get_peft_model(model, lcfg)


def build_model(cfg, task, run: RunId):
    """The model of one run, trainable parameters chosen by the method (LoRA init from seed).

    Args:
        cfg: the SweepConfig (model, targets, α policy, split seed).
        task: the TaskData; ``kind`` and ``num_labels`` are read.
        run: the grid cell; its seed draws the LoRA A factors.
    Returns:
        The model, float32 on the CPU, in eval mode.
    """
    model = load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    torch.manual_seed(run.seed)
    if run.method == "lora":
        return wrap_lora(model, cfg, rank=run.rank, kind=task.kind)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters that train, of the model itself when ``model`` is its DDP wrapper."""
    module = model.module if hasattr(model, "module") else model
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
