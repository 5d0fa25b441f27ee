"""A run's model: the pretrained model with the task's head, checked against the grid, and
made trainable by the run's method (every weight for full fine-tuning, a peft adapter for LoRA).
"""
from __future__ import annotations

import torch

from rankscope.errors import InputError
from rankscope.store.runs import RunId
from rankscope.train.corpora import DISTILL
from rankscope.train.models import HEADS, find_linear_modules, is_target, load_pretrained, \
    quiet_transformers, resolve_model


def _no_dropout(name) -> dict[str, float]:
    """Config overrides that set every dropout rate of a model's config to 0."""
    from transformers import AutoConfig

    with quiet_transformers():
        config = AutoConfig.from_pretrained(resolve_model(name)).to_dict()
    return {k: 0.0 for k, v in config.items() if "dropout" in k and isinstance(v, float)}


def load_task_model(cfg, *, kind: str, num_labels: int | None):
    """The pretrained model with the head the task needs, float32 on the CPU.

    lm and sft: the causal LM. cls: a sequence classifier with a new head. distill (the
    planted task): the backbone, a causal LM's without its head and an encoder's without its
    pooler (the loss reads the final hidden states, and a parameter with no gradient is one
    DDP refuses), with every
    dropout rate 0: the teacher is a deterministic function, which a student under dropout
    could never match (on MiniLM the dropout noise made the training loss ~10× the held-out
    loss and swamped the signal of ΔW*).

    A new classification head is drawn from ``split_seed``, not from whatever state the global
    generator is in, so the base evaluation and every run start from the same head whatever ran
    before them in the process (other runs, a resume).

    Args:
        cfg: the SweepConfig (model, split_seed).
        kind: "lm", "sft", "cls" or "distill"; num_labels: the classes of cls.
    Raises:
        InputError: the model cannot be loaded (see ``load_pretrained``).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "cls":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.split_seed)
            model = load_pretrained(AutoModelForSequenceClassification, cfg.model,
                                    num_labels=num_labels)
    elif kind == DISTILL:
        model = load_pretrained(AutoModel, cfg.model, **_no_dropout(cfg.model))
        if getattr(model, "pooler", None) is not None:
            model.pooler = None
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
        hits = [i for i in infos if is_target(i.name, t)]
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
    if kind == "cls":                   # peft also trains (and saves) the new head
        task_type = TaskType.SEQ_CLS
    elif kind == DISTILL:               # the student is a bare backbone
        task_type = TaskType.FEATURE_EXTRACTION
    else:
        task_type = TaskType.CAUSAL_LM
    lcfg = LoraConfig(r=rank, lora_alpha=cfg.lora_alpha(rank), target_modules=targets,
                      lora_dropout=0.0, use_rslora=cfg.alpha_policy == "rslora",
                      task_type=task_type)
    return get_peft_model(model, lcfg)


def build_model(cfg, task, run: RunId):
    """The model of one run, trainable parameters chosen by the method (LoRA init from seed).

    Full fine-tuning trains every parameter (``full_scope: all``), the LoRA targets' weights
    (``targets``, see ``linear_scope``), or (``linear``) only the weights that ΔW is defined for, the backbone's linear weights, and a new classification
    head: embeddings, norms and biases stay at their pretrained values, so the full run
    changes what a LoRA run can change, and nothing else. The head is new (it has no
    pretrained value to keep) and LoRA trains it too, so the comparison stays fair.

    Args:
        cfg: the SweepConfig (model, targets, α policy, split seed, full_scope).
        task: the TaskData; ``kind`` and ``num_labels`` are read.
        run: the grid cell; its seed draws the LoRA A factors.
    Returns:
        The model, float32 on the CPU, in eval mode.
    """
    model = load_task_model(cfg, kind=task.kind, num_labels=task.num_labels)
    torch.manual_seed(run.seed)
    if run.method == "lora":
        return wrap_lora(model, cfg, rank=run.rank, kind=task.kind)
    keep = None if cfg.full_scope == "all" else linear_scope(
        model, kind=task.kind, targets=None if cfg.full_scope == "linear" else cfg.targets)
    for p in model.parameters():
        p.requires_grad_(keep is None or id(p) in keep)
    return model


def linear_scope(model, *, kind: str, targets: tuple[str, ...] | None = None) -> set[int]:
    """The ids of the parameters that ``full_scope: linear`` trains: the weight of every linear
    module outside the output layers (``HEADS``), and every parameter of a new classification
    head (cls); a pretrained output layer (an LM head) is not the backbone's, and stays.

    With ``targets`` (``full_scope: targets``), only the weights of the modules LoRA adapts
    (named as PEFT's ``target_modules`` name them: the module's name or its last dotted parts;
    ``all-linear`` is every one): the full-rank counterpart of the LoRA runs, so that the two
    differ in rank alone."""
    every = targets is None or tuple(targets) == ("all-linear",)
    keep = {id(model.get_submodule(i.name).weight) for i in find_linear_modules(model)
            if not HEADS & set(i.name.split(".")) and (every or any(
                is_target(i.name, t) for t in targets))}
    if kind == "cls":
        keep |= {id(p) for n, p in model.named_parameters() if HEADS & set(n.split("."))}
    return keep


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters that train, of the model itself when ``model`` is its DDP wrapper."""
    module = model.module if hasattr(model, "module") else model
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]
