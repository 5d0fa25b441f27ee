"""What an export reads: the updates (``analysis.deltas``), the model an adapter for them goes
on, and what must travel with them.

The model (the "host") is the base model in the class the source was trained in: a run's
task model (causal LM, sequence classifier, or the bare backbone of the planted task), an
adapter's PEFT task type, or a model pair's fine-tuned architecture. Module names are the
host's, so the adapter's keys are the ones ``PeftModel.from_pretrained`` looks for on it.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rankscope.analysis.deltas import DeltaSet, from_adapter, from_model_pair, from_run, \
    read_adapter_config
from rankscope.errors import InputError
from rankscope.linalg.spectra import check_finite
from rankscope.store.runs import LABELS, OTHERS, find_runs, read_json_object, read_manifest, \
    read_tensors
from rankscope.train.models import HEADS, find_linear_modules, is_target, load_pretrained, \
    resolve_model

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION")
_FACTOR_KEY = re.compile(r"\.lora_[AB](?:\.[^.]+)?\.weight$")
PREFIX = "base_model.model."


@dataclass(frozen=True)
class Source:
    """The updates to export and the model they belong to.

    ``final`` (full fine-tunes) gives the final value of every parameter that has no ΔW
    (norms, biases, embeddings, a head), by host name; ``carried`` (LoRA) holds the adapter's
    ``modules_to_save`` parameters, which travel into the export as they are.
    """

    deltas: DeltaSet
    base: str                    # the base model, as the adapter config records it
    task_type: str               # one of TASK_TYPES
    describe: dict               # what export.json says of the source
    final: Callable[[], dict[str, torch.Tensor]] | None = None
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    modules_to_save: tuple[str, ...] = ()
    num_labels: int | None = None
    labels: dict | None = None   # a classification head's label names (``store.runs.label_file``)

    @property
    def lora(self) -> bool:
        return self.deltas.method == "lora"


def resolve_source(run: str | Path | None = None, *, adapter: str | Path | None = None,
                   base: str | None = None, finetuned: str | None = None) -> Source:
    """The source named by one of ``rankscope export``'s three forms.

    Args:
        run: one finished run folder (full or LoRA), or a sweep folder holding just one.
        adapter: a PEFT LoRA adapter folder; ``base`` overrides its config's base model.
        base, finetuned: a model pair (``finetuned`` needs ``base``).
    Raises:
        InputError: no form or several, a missing path, a sweep of several runs, or what the
            readers of ``analysis.deltas`` refuse.
    """
    if run is not None:
        if adapter is not None or finetuned is not None or base is not None:
            raise InputError("give a run folder, or --adapter, or --base with --finetuned: not several")
        return _from_run(run)
    if adapter is not None and finetuned is not None:
        raise InputError("give --adapter or --finetuned, not both")
    if adapter is not None:
        return _from_adapter(Path(adapter), base, {"kind": "adapter", "adapter": str(adapter)})
    if finetuned is not None:
        if base is None:
            raise InputError("--finetuned needs --base (the model it was fine-tuned from)")
        return _from_pair(base, finetuned)
    raise InputError("nothing to export: give a run folder, --adapter or --base with --finetuned")


def _from_run(path) -> Source:
    runs = find_runs(path)
    if len(runs) != 1:
        raise InputError(f"{path} holds {len(runs)} finished runs: name one run folder, "
                         f"e.g. {runs[0]}")
    run_dir = runs[0]
    manifest = read_manifest(run_dir)
    trained_at = manifest.get("model_path")   # the folder on the machine that trained it
    base = str(trained_at if trained_at and Path(trained_at).exists() else manifest.get("model"))
    describe = {"kind": "run", "run": str(run_dir), "method": manifest.get("method")}
    kind = manifest.get("task_kind")
    task_type = "SEQ_CLS" if kind == "cls" else "FEATURE_EXTRACTION" if kind == "distill" \
        else "CAUSAL_LM"
    if manifest.get("method") == "lora":      # its adapter/ is the standard PEFT folder
        return _from_adapter(run_dir / "adapter", base, describe, task_type=task_type)
    deltas = from_run(run_dir)

    @functools.cache
    def final() -> dict[str, torch.Tensor]:
        return read_tensors(run_dir / OTHERS)[0]

    labels = _head_rows(final(), run_dir / OTHERS) if task_type == "SEQ_CLS" else None
    names = {k: manifest[k] for k in ("num_labels", "id2label", "label2id")} \
        if "id2label" in manifest else None          # the run recorded ``label_file``'s three
    return Source(deltas, base, task_type, describe, final=final, num_labels=labels, labels=names)


def _from_adapter(adapter_dir: Path, base: str | None, describe: dict, *,
                  task_type: str | None = None) -> Source:
    deltas = from_adapter(adapter_dir)        # the host checks names and shapes
    cfg = read_adapter_config(adapter_dir)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise InputError(f"adapter {adapter_dir} names no base model: give --base")
    base = _base_name(base)
    task_type = cfg.get("task_type") or task_type or _pair_task_type(base)
    if task_type not in TASK_TYPES:
        raise InputError(f"adapter {adapter_dir} is for task type {task_type}; export handles "
                         f"{', '.join(TASK_TYPES)}")
    saved = tuple(cfg.get("modules_to_save") or ())
    carried = _carried(adapter_dir, saved)
    labels = _head_rows(carried, adapter_dir) if task_type == "SEQ_CLS" else None
    names = read_json_object(adapter_dir / LABELS, "label file") if (adapter_dir / LABELS).is_file() \
        else None
    return Source(deltas, base, task_type, {**describe, "method": "lora"},
                  carried=carried, modules_to_save=saved, num_labels=labels, labels=names)


def _carried(adapter_dir: Path, saved: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The adapter's tensors besides its LoRA factors, by host name: its modules_to_save.

    Raises:
        InputError: a tensor that is neither (LoRA on embeddings, DoRA magnitudes, biases,
            trainable tokens): an export could not carry it faithfully; NaN/Inf.
    """
    st = adapter_dir / "adapter_model.safetensors"
    if not st.is_file():                      # an adapter_model.bin: its factors were read
        if saved:
            raise InputError(f"adapter {adapter_dir} keeps modules_to_save in adapter_model.bin: "
                             "export carries them from adapter_model.safetensors only")
        return {}
    out = {}
    for key, t in read_tensors(st)[0].items():
        if _FACTOR_KEY.search(key):
            continue
        name = key.removeprefix(PREFIX)
        parts = name.split(".")
        owners = [".".join(parts[:i]) for i in range(1, len(parts))]
        if "lora_" in key or not any(is_target(o, m) for o in owners for m in saved):
            raise InputError(f"adapter {adapter_dir} holds {key}, neither a LoRA factor nor a "
                             "module to save: export cannot carry it")
        check_finite(t, what=f"{key} in {adapter_dir}")
        out[name] = t
    return out


def _from_pair(base: str, finetuned: str) -> Source:
    deltas = from_model_pair(base, finetuned)
    task_type = _pair_task_type(finetuned, refuse_heads=True)
    cls = _host_class(task_type)

    def final() -> dict[str, torch.Tensor]:
        model = load_pretrained(cls, finetuned)
        covered = {f"{i.name}.weight" for i in find_linear_modules(model)
                   if not HEADS & set(i.name.split("."))}     # the weights ΔW covers
        return {n: p.detach() for n, p in model.named_parameters() if n not in covered}

    describe = {"kind": "model-pair", "base": str(base), "finetuned": str(finetuned),
                "method": "full"}
    return Source(deltas, _base_name(base), task_type, describe, final=final)


def _pair_task_type(name: str, *, refuse_heads: bool = False) -> str:
    """CAUSAL_LM for a causal LM's folder, FEATURE_EXTRACTION for a bare backbone.

    Raises:
        InputError: (``refuse_heads``) another architecture, e.g. a sequence classifier: its
            head has no base value, which a model pair cannot supply.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = AutoConfig.from_pretrained(resolve_model(name)).architectures or []
    if set(archs) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):    # GPT2LMHeadModel too
        return "CAUSAL_LM"
    if refuse_heads and not all(a.endswith("Model") for a in archs):
        raise InputError(f"{name} is a {archs[0]}: a model pair exports causal LMs and bare "
                         "backbones; export its run folder instead")
    return "FEATURE_EXTRACTION"


def _base_name(name: str) -> str:
    """A model name a loader elsewhere can use: a local folder made absolute, a registry name
    resolved to its folder, a hub id kept as it is."""
    path = Path(str(name)).expanduser()
    if path.exists():
        return str(path.resolve())
    return str(name) if "/" in str(name) else str(resolve_model(name))


def _head_rows(tensors: dict[str, torch.Tensor], where) -> int:
    """The classes of a sequence classifier: the rows of its head's last weight."""
    heads = sorted(n for n, t in tensors.items()
                   if HEADS & set(n.split(".")) and n.endswith(".weight") and t.ndim == 2)
    if not heads:
        raise InputError(f"{where} holds no classification head, which a sequence-classification "
                         "adapter needs")
    return int(tensors[heads[-1]].shape[0])


def _host_class(task_type: str):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification,
            "FEATURE_EXTRACTION": AutoModel}[task_type]


def load_host(source: Source) -> nn.Module:
    """The base model in the class the adapter is for, float32 on the CPU."""
    kwargs = {"num_labels": source.num_labels} if source.task_type == "SEQ_CLS" else {}
    return load_pretrained(_host_class(source.task_type), source.base, **kwargs)
