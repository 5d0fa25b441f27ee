"""Write a PEFT LoRA adapter folder from a source's updates at the ranks a rule chooses.

Each module's ΔW is decomposed once (``analysis.decompose``, i.e. ``update_svd``: the exact
factorized SVD of s·B·A for a LoRA update, a dense float32 SVD otherwise), cut to its rank k
and written as the balanced pair B = U_k·S_k^½, A = S_k^½·V_kᵀ with ``lora_alpha = r`` per
module: peft's scale α/r is then 1 and B·A is exactly trunc_k(ΔW) (``ranks.balanced_factors``).
peft makes the folder itself: ``get_peft_model`` on the base model with the exact module
names as ``target_modules``, the factors loaded with ``set_peft_model_state_dict``, then
``save_pretrained``.

Why not ``peft.tuners.lora.conversion.convert_to_lora``/``save_as_lora``: they convert a model
whose PEFT layers hold an additive adapter, and a full fine-tune's ΔW sits in no PEFT layer;
they decompose every delta densely with ``torch.linalg.svd``, where a LoRA update has an
exact SVD through its r × r core and rankscope decomposes an update in one place; they take
one rank or one threshold for all modules, not a recommendation's per-module ranks; and they
put all of S into B.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from rankscope.analysis.decompose import decompose
from rankscope.errors import InputError
from rankscope.export.heldout import heldout_metrics
from rankscope.export.ranks import RankRule, balanced_factors, lora_params, planned_rank, \
    retained_energy
from rankscope.export.sources import PREFIX, Source, load_host
from rankscope.linalg.spectra import check_finite, rank_at_energy, svd_device
from rankscope.store.atomic import atomic_dir, atomic_write_json, atomic_write_text, \
    check_out_apart, check_out_dir
from rankscope.store.provenance import provenance
from rankscope.store.runs import LABELS
from rankscope.train.models import find_linear_modules, match_name

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "rankscope.export/1"


def export_adapter(source: Source, *, rule: RankRule, out: str | Path, overwrite: bool = False,
                   save_changed: bool = False, device: str | None = "auto",
                   evaluate: bool = True) -> dict:
    """Write ``out`` as a PEFT LoRA adapter folder holding ``source``'s updates at ``rule``'s ranks.

    ``out`` gets ``adapter_config.json``, ``adapter_model.safetensors`` (and peft's README.md)
    and ``export.json``, all at once or not at all. A module whose ΔW is zero, or which a
    ``--from`` config leaves out, gets no adapter. A full source's other parameters that
    changed (norms, biases, embeddings, a head) go into ``modules_to_save`` with
    ``save_changed``, else export.json lists them under ``changed_not_saved``; a LoRA source's
    own ``modules_to_save`` travel as they are.

    Args:
        source: from ``sources.resolve_source``.
        rule: how each module's rank is chosen.
        out: the adapter folder to write.
        overwrite: replace an ``out`` folder that has other content.
        save_changed: put the full source's changed non-ΔW parameters into modules_to_save.
        device: where dense SVDs run: "auto" (CUDA when present), "cpu" or "cuda".
        evaluate: when the source is a sweep run, evaluate the written adapter on the run's
            held-out split (``heldout.heldout_metrics``) into export.json's ``heldout``.
    Returns:
        The record written to export.json.
    Raises:
        InputError: conflicting options, an output folder that is or holds an input, a rank
            the rule cannot give a module, nothing to export, a changed parameter that
            modules_to_save cannot carry, a source that does not fit its base model.
    """
    _check_options(source, save_changed)
    check_out_dir(out, overwrite=overwrite)
    check_out_apart(out, [source.describe.get(k) for k in ("run", "adapter", "base", "finetuned")]
                     + [rule.config_path])
    device = svd_device(device)
    host = load_host(source)
    factors, rows = truncated_factors(source, host, rule, device=device)
    saved, extras, left = _other_parameters(source, host, set(factors), save_changed=save_changed)
    record = {"format": EXPORT_FORMAT, "source": source.describe, "base_model": source.base,
              "task_type": source.task_type, "rule": rule.describe(),
              "factors": "B = U_k diag(S_k)^1/2, A = diag(S_k)^1/2 V_k^T, lora_alpha = r (scale 1)",
              "svd": {"dense": "float32", "lora": "exact factorized, float64", "device": device},
              "n_modules": len(factors),
              "lora_params": int(sum(lora_params((r["d_out"], r["d_in"]), r["rank"]) for r in rows)),
              "modules_to_save": saved, "changed_not_saved": left, "modules": rows,
              **provenance()}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_adapter(host, tmp, factors=factors, extras=extras, modules_to_save=saved,
                      task_type=source.task_type, base=source.base)
        if source.labels:           # a classification head loads only with its label count
            atomic_write_text(tmp / LABELS, json.dumps(source.labels, indent=2) + "\n")
        if evaluate and source.describe.get("kind") == "run":      # the folder as peft loads it
            record["heldout"] = heldout_metrics(source.describe["run"], tmp)
        atomic_write_json(tmp / EXPORT_FILE, record)
    return record


def _check_options(source: Source, save_changed: bool) -> None:
    if save_changed and source.lora:
        raise InputError("--save-changed-modules is for full fine-tunes: a LoRA adapter's own "
                         "modules_to_save travel with it as they are")
    if source.task_type == "SEQ_CLS" and not source.lora and not save_changed:
        raise InputError(f"{source.describe.get('run')} trained a new classification head, which "
                         "only modules_to_save can carry: add --save-changed-modules")



def truncated_factors(source: Source, host: nn.Module, rule: RankRule, *,
                      device: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[dict]]:
    """Each module's balanced rank-k factors, by host name, and one export.json row per module.

    Modules are streamed: one update is read and decomposed at a time, and only its k
    factors are kept. A module with k = 0 is not decomposed.

    Returns:
        ({name: (B (d_out, k), A (k, d_in))}, rows: name, layer, module, d_out, d_in,
        source_rank, rank, retained_energy, fro_norm, note).
    Raises:
        InputError: a source module the base model lacks, a rank the rule cannot give, or
            nothing to export.
    """
    infos = {i.name: i for i in find_linear_modules(host)}
    factors, rows = {}, []
    for d in source.deltas:
        name = match_name(d.name, infos.keys())
        if name is None or (infos[name].d_out, infos[name].d_in) != (d.d_out, d.d_in):
            raise InputError(f"module {d.name} ({d.d_out}×{d.d_in}) of the source is not a linear "
                             f"module of {source.base}: the update was made for another model")
        k = planned_rank(rule, name, shape=(d.d_out, d.d_in), source_rank=d.rank)
        row = {"name": name, "layer": d.layer, "module": d.module, "d_out": d.d_out,
               "d_in": d.d_in, "source_rank": d.rank}
        if k == 0:          # left out by the config: no SVD, only its norm for the record
            fro = float(torch.linalg.vector_norm(d.materialize(torch.float64)))
            rows.append({**row, "rank": 0, "retained_energy": 0.0 if fro else None,
                         "fro_norm": fro, "note": "not in the config's target_modules"})
            continue
        dec = decompose(d, device=device)
        k = rank_at_energy(dec.S, rule.energy) if k is None else k
        zero = not bool(dec.S.any())
        if not zero:
            factors[name] = balanced_factors(dec.U, dec.S, dec.Vh, k)
        rows.append({**row, "rank": 0 if zero else k,
                     "retained_energy": retained_energy(dec.S, k), "fro_norm": dec.fro,
                     "note": "zero update" if zero else ""})
    if not factors:
        raise InputError("nothing to export: every update is zero or left out by --from")
    return factors, rows


def _other_parameters(source: Source, host: nn.Module, targets: set[str], *,
                      save_changed: bool) -> tuple[list[str], dict[str, torch.Tensor], list[str]]:
    """(modules_to_save, their parameters by host name, changed parameters left out)."""
    if source.lora:
        return list(source.modules_to_save), dict(source.carried), []
    changed = changed_parameters(host, source.final(), where=source.describe.get("run")
                                 or source.describe.get("finetuned"))
    if not save_changed:
        return [], {}, sorted(changed)
    modules = save_modules(host, changed, targets)
    extras = {}
    for m in modules:
        for n, p in host.get_submodule(m).named_parameters():
            extras[f"{m}.{n}"] = changed.get(f"{m}.{n}", p.detach())
    return modules, extras, []


def changed_parameters(host: nn.Module, final: dict[str, torch.Tensor], *,
                       where) -> dict[str, torch.Tensor]:
    """The parameters whose final value differs from the base model's, by name.

    Raises:
        InputError: a parameter the base model lacks or has in another shape; NaN/Inf.
    """
    params = dict(host.named_parameters())
    changed = {}
    for n, v in final.items():
        p = params.get(n)
        if p is None:
            raise InputError(f"{where}: parameter {n} is not in the base model")
        if tuple(v.shape) != tuple(p.shape):
            raise InputError(f"{where}: parameter {n} is {tuple(v.shape)}, the base model's "
                             f"{tuple(p.shape)}")
        check_finite(v, what=f"parameter {n} of {where}")
        if not torch.equal(v.to(p.dtype), p.detach()):
            changed[n] = v
    return changed


def save_modules(host: nn.Module, changed: dict[str, torch.Tensor], targets: set[str]) -> list[str]:
    """The modules that hold the changed parameters, outermost only, for PEFT's modules_to_save.

    PEFT saves such a module whole, beside the base model's: it must hold no LoRA adapter,
    share no parameter with another module, and not be the model itself.

    Raises:
        InputError: one line naming the first parameter that modules_to_save cannot carry.
    """
    aliases: dict[int, list[str]] = {}
    for n, p in host.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    params = dict(host.named_parameters())
    for n in sorted(changed):
        tied = [a for a in aliases[id(params[n])] if a != n]
        if tied:
            raise InputError(f"--save-changed-modules: {n} changed but is tied to {tied[0]}; "
                             "saving its module would untie them")
        if "." not in n:
            raise InputError(f"--save-changed-modules: {n} changed and belongs to the model "
                             "itself, not to a module that could be saved")
    owners = sorted({n.rpartition(".")[0] for n in changed})
    top = [m for m in owners if not any(m.startswith(o + ".") for o in owners)]
    for m in top:
        hit = next((t for t in sorted(targets) if t == m or t.startswith(m + ".")), None)
        if hit is not None:
            first = next(n for n in sorted(changed) if n.startswith(m + "."))
            raise InputError(f"--save-changed-modules: {first} changed, but {m} holds the LoRA "
                             f"adapter of {hit} and PEFT cannot also save it whole; export "
                             "without the flag to leave it out")
    return top


def write_adapter(host: nn.Module, folder: Path, *, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                  extras: dict[str, torch.Tensor], modules_to_save: list[str],
                  task_type: str | None, base: str) -> None:
    """Save the PEFT adapter folder of ``factors`` (and ``extras``) on ``host``, with peft.

    r is the most common rank (ties: the larger) and rank_pattern names the modules whose
    rank differs, by their full names; lora_alpha and alpha_pattern equal them, so every
    module's scale is 1. ``host`` is wrapped in place.

    Args:
        host: the base model, in the class the adapter is for.
        folder: an existing folder to save into.
        factors: {module name: (B (d_out, k), A (k, d_in))}, y = W x orientation (also for
            a Conv1D, whose LoRA layers peft builds in that orientation too).
        extras: {parameter name: value} of the modules_to_save.
    Raises:
        InputError: an extra parameter the wrapped model has no place for.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ranks = {n: A.shape[0] for n, (B, A) in factors.items()}
    counts = Counter(ranks.values())
    r0 = max(counts, key=lambda r: (counts[r], r))
    pattern = {n: k for n, k in ranks.items() if k != r0}
    conv1d = {i.name for i in find_linear_modules(host) if i.fan_in_fan_out}
    config = LoraConfig(r=r0, lora_alpha=r0, target_modules=sorted(ranks), rank_pattern=pattern,
                        alpha_pattern=dict(pattern), lora_dropout=0.0, bias="none",
                        fan_in_fan_out=bool(conv1d & set(ranks)), task_type=task_type,
                        modules_to_save=list(modules_to_save) or None,
                        base_model_name_or_path=base)
    model = get_peft_model(host, config)
    state = {f"{PREFIX}{k}": v for k, v in extras.items()}
    for n, (B, A) in factors.items():
        state[f"{PREFIX}{n}.lora_A.weight"], state[f"{PREFIX}{n}.lora_B.weight"] = A, B
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise InputError(f"{result.unexpected_keys[0]} has no place in the adapter on {base}")
    model.save_pretrained(folder, save_embedding_layers=False)
