"""One run: full fine-tuning or LoRA (through peft) on one task, resumable and deterministic.

Every run of a sweep sees the same held-out split, the same batches in the same order (drawn
from the seed), the same schedule and the same number of tokens: only the method differs.
Under ``torchrun`` the global batch is split across processes (DDP; gloo on CPU, nccl on
CUDA) and the loss is normalised by the global token count, so N processes compute the same
update as one.
"""
from __future__ import annotations

import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rankscope.train.config import SweepConfig
from rankscope.train.data import TASKS, TaskData
from rankscope.errors import InputError
from rankscope.train.models import find_linear_modules, linear_weight, load_pretrained, match_name, resolve_model

FORCE_BF16_ENV = "RANKSCOPE_FORCE_BF16"     # 1/0: use_bf16's default, whatever the chip


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) data-parallel group."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun, else a single process."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device: cuda was asked for but no CUDA device is available")
    if want_cuda:       # TF32 tensor cores for the float32 matmuls outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    dev = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def leave_dist() -> None:
    """Leave the torchrun process group, once every process has finished its runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def task_kind(cfg: SweepConfig) -> str:
    """lm, sft or cls for the configured task or user data."""
    return cfg.task_kind if cfg.data is not None else TASKS[cfg.task].kind


def load_task_model(cfg: SweepConfig, *, kind: str, num_labels: int | None):
    """The pretrained model with the head the task needs, float32 on the CPU.

    A new classification head is drawn from ``split_seed``, not from whatever state the global
    generator is in, so the base evaluation and every run start from the same head whatever ran
    before them in the process (other runs, a resume).
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
        heads = {n for n in ("lm_head", "classifier", "score", "cls")}
        adapted = [i for i in infos if not heads & set(i.name.split("."))]
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


def wrap_lora(model, cfg: SweepConfig, *, rank: int, kind: str):
    """The model wrapped by peft with a fresh LoRA adapter of rank r (B = 0, A random)."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = "all-linear" if tuple(cfg.targets) == ("all-linear",) else list(cfg.targets)
    lcfg = LoraConfig(r=rank, lora_alpha=cfg.lora_alpha(rank), target_modules=targets,
                      lora_dropout=0.0, use_rslora=cfg.alpha_policy == "rslora",
                      task_type=TaskType.SEQ_CLS if kind == "cls" else TaskType.CAUSAL_LM)
    return get_peft_model(model, lcfg)


def lr_lambda(step: int, *, total: int, warmup: float, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then the decay."""
    n_warm = int(round(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    if schedule == "constant":
        return 1.0
    progress = (step - n_warm) / max(1, total - n_warm)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def batch_order(n: int, *, steps: int, per_step: int, seed: int) -> torch.Tensor:
    """The example indices of every step, (steps, per_step): epochs of seeded permutations."""
    g = torch.Generator().manual_seed(seed)
    need = steps * per_step
    perms = [torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))]
    return torch.cat(perms)[:need].view(steps, per_step)


def loss_sum(model, batch: dict[str, torch.Tensor], *, kind: str) -> tuple[torch.Tensor, int]:
    """The summed loss of a batch and how many targets it summed over."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.float()
    if kind == "cls":
        return F.cross_entropy(logits, batch["labels"], reduction="sum"), batch["labels"].numel()
    # shift the labels, not the logits: a (B, L-1, V) slice of the logits would be copied
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)        # (B, L): the next token
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum")
    return loss, int((labels != -100).sum())


def use_bf16(setting: bool | None, device: torch.device) -> bool:
    """Whether to train under bf16 autocast: as set, else on CUDA and on CPUs with native bf16.

    A CPU without AVX-512 BF16 or AMX has no fast bf16 matmul: oneDNN is skipped and torch falls
    back to a reference GEMM loop, measured at ~100× slower than float32 on a 2-core AMD EPYC.

    The environment variable ``RANKSCOPE_FORCE_BF16`` (``1`` or ``0``) replaces the chip's answer
    when ``setting`` is None, on any device: it exists so that the test suite can be run once as
    a chip with native bf16 would run it and once as one without. An explicit setting wins.

    Args:
        setting: the configured ``bf16`` (True, False, or None for the default).
        device: where the run trains.
    Returns:
        True to train and evaluate under bf16 autocast.
    Raises:
        InputError: ``RANKSCOPE_FORCE_BF16`` is set to something other than 1, 0 or empty.
    """
    if setting is not None:
        return setting
    forced = os.environ.get(FORCE_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise InputError(f"{FORCE_BF16_ENV} must be 1 or 0, got {forced!r}")
        return forced == "1"
    if device.type == "cuda":
        return True
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on float32 weights (never bf16 weights: small updates would round away)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def evaluate(model, data: dict[str, torch.Tensor], *, kind: str, device: torch.device,
             bf16: bool, batch_size: int = 16) -> dict[str, float]:
    """Held-out loss (and perplexity, or accuracy for classification)."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    n = data["input_ids"].shape[0]
    for i in range(0, n, batch_size):
        batch = {k: v[i:i + batch_size].to(device) for k, v in data.items()}
        with autocast(device, bf16):
            if kind == "cls":           # one forward pass for both the loss and the accuracy
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits.float()
                loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
                m = batch["labels"].numel()
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                loss, m = loss_sum(model, batch, kind=kind)
        total, count = total + float(loss), count + m
    model.train(was_training)
    result = {"loss": total / max(count, 1)}
    if kind == "cls":
        result["accuracy"] = correct / max(count, 1)
    else:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the CPU resident-set peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def full_updates(model, base_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ΔW = W_ft − W_0 (float32) for every linear module of the pretrained backbone, and the
    final values of every other parameter (norms, biases, embeddings, a new head).

    The second dict lets a truncation test rebuild the fine-tuned model exactly; ΔW is defined
    only for linear weights that the pretrained checkpoint has (a new head is not an update).
    """
    from rankscope.train.models import load_backbone

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


def lora_updates(peft_model) -> dict[str, torch.Tensor]:
    """The LoRA factors A (r, d_in), B (d_out, r) and scaling of every adapted module."""
    out = {}
    prefix = "base_model.model."
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            key = name[len(prefix):] if name.startswith(prefix) else name
            out[f"{key}.lora_A"] = mod.lora_A["default"].weight.detach().float().cpu()
            out[f"{key}.lora_B"] = mod.lora_B["default"].weight.detach().float().cpu()
            out[f"{key}.scaling"] = torch.tensor(float(mod.scaling["default"]))
    return out


def tokens_in(task: TaskData, idx: torch.Tensor) -> int:
    """Training targets (non-ignored tokens, or examples for classification) at ``idx``."""
    labels = task.train["labels"][idx]
    if task.kind == "cls":
        return int(task.train["attention_mask"][idx].sum())
    return int((labels != -100).sum())


def resolved_model_path(name: str) -> str:
    """The local folder a model name resolves to (recorded in the manifest)."""
    return str(resolve_model(name))


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0
