"""Sources of weight updates ΔW, each turned into one uniform stream of per-module updates.

Three sources:
    * a full fine-tuned model against its base: ΔW = W_ft − W_0 for every matched linear weight;
    * a PEFT LoRA adapter folder: ΔW = s·B·A, s = α/r (α/√r under ``use_rslora``), with
      ``rank_pattern``/``alpha_pattern`` resolved per module as peft resolves them;
    * rankscope run folders (see ``rankscope.store.runs``), LoRA kept as its factors (with A at
      initialisation, A₀, when the run saved it).
LoRA updates stay factored: their spectra never need the dense d_out × d_in matrix.
``check_same_setup`` refuses runs of different setups before any comparison.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from rankscope.errors import InputError
from rankscope.train.models import FLOATS, LinearInfo, WeightReader, find_linear_modules, \
    match_name, meta_backbone, parse_names, read_config, resolve_model
from rankscope.store.runs import UPDATES, TensorFile, find_runs, read_json_object, read_manifest, \
    read_tensors
from rankscope.linalg.spectra import check_finite


# Manifest fields that must agree across a sweep's runs: same model, same data and split, same
# held-out set and the same training length, else their updates and metrics are not comparable.
SAME_SETUP = ("model", "task", "data", "task_kind", "data_hash", "split_hash", "n_train_examples",
              "n_eval_examples", "steps", "tokens_per_step")


@dataclass(frozen=True)
class ModuleDelta:
    """The update of one linear module: dense ΔW, or LoRA factors with ΔW = scale·B·A."""

    name: str
    layer: int | None
    module: str
    d_out: int
    d_in: int
    dense: torch.Tensor | None = None   # (d_out, d_in)
    B: torch.Tensor | None = None       # (d_out, r)
    A: torch.Tensor | None = None       # (r, d_in)
    scale: float = 1.0
    A0: torch.Tensor | None = None      # (r, d_in) A at initialisation, when the run saved it

    @property
    def factored(self) -> bool:
        return self.dense is None

    @property
    def rank(self) -> int | None:
        """The LoRA rank r, or None for a dense update."""
        return None if self.A is None else self.A.shape[0]

    def materialize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW (d_out, d_in) in ``dtype`` (one definition, explicit scaling)."""
        if self.dense is not None:
            return self.dense.to(dtype)
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(frozen=True)
class DeltaSet:
    """The updates of one run or model, with the identifiers every result row carries."""

    run: str
    method: str                 # "full" or "lora"
    rank: int | None            # LoRA rank (the adapter's default r); None for full
    seed: int | None
    meta: dict = field(default_factory=dict)
    load: Callable[[], Iterator[ModuleDelta]] = field(default=lambda: iter(()), repr=False)
    n_modules: int | None = None

    def __iter__(self) -> Iterator[ModuleDelta]:
        return self.load()


# ----------------------------------------------------------------------- model pairs

def from_model_pair(base: str | Path, finetuned: str | Path) -> DeltaSet:
    """ΔW = W_ft − W_0 for every linear weight of two models of one architecture.

    Each model is read by its own ``models.WeightReader``: safetensors checkpoints
    (``model.safetensors``, or shards listed in ``model.safetensors.index.json``) are streamed,
    one module's weight at a time from the memory-mapped files, in float32, only when the
    stream reaches it, so peak memory is a few matrices whatever the models' size; a folder
    with only ``pytorch_model.bin`` is loaded whole. The modules (names, layer, kind, shapes,
    Conv1D orientation) are the base's, from its architecture (built on the meta device when
    streamed). Checkpoint keys are matched to module names by dotted suffix (``match_name``: a
    causal LM's keys carry a ``model.`` prefix). Unchanged weights are skipped.

    Args:
        base: the base model: a registry name, a model folder or a hub id (``resolve_model``).
        finetuned: the fine-tuned model, likewise.
    Returns:
        A "full" ``DeltaSet`` named after ``finetuned``; its stream gives one dense
        (d_out, d_in) float32 ΔW per changed module.
    Raises:
        InputError: different architectures (config ``model_type``), a module missing from
            the fine-tuned model, a shape mismatch, a corrupt or truncated safetensors file, a
            shard its index names that is missing, a weight stored in a non-float dtype, or
            (when the stream reads it) NaN/Inf in a weight.
    """
    types = [read_config(resolve_model(m)).model_type for m in (base, finetuned)]
    if types[0] != types[1]:
        raise InputError(f"models of different architectures: base {base} is {types[0]}, "
                         f"finetuned {finetuned} is {types[1]}")
    r0, r1 = WeightReader(base), WeightReader(finetuned)
    keys = {info.name: _pair_keys(info, r0, r1) for info in r0.infos}

    def load() -> Iterator[ModuleDelta]:
        for info in r0.infos:
            k0, k1 = keys[info.name]
            w0, w1 = r0.read(k0, info).float(), r1.read(k1, info).float()   # (d_out, d_in)
            check_finite(w0, what=f"weight {info.name} of {base}")
            check_finite(w1, what=f"weight {info.name} of {finetuned}")
            delta = w1 - w0
            if not delta.any():
                continue
            yield ModuleDelta(info.name, info.layer, info.module, info.d_out, info.d_in,
                              dense=delta)

    meta = {"source": "model-pair", "base": str(base), "finetuned": str(finetuned)}
    return DeltaSet(Path(str(finetuned)).name, "full", None, None, meta, load, len(r0.infos))


def _pair_keys(info: LinearInfo, r0: WeightReader, r1: WeightReader) -> tuple[str, str]:
    """Where the base (``r0``) and the fine-tuned model (``r1``) store ``info``'s weight,
    checked for presence, shape and a float dtype before any weight is read."""
    want = (info.d_out, info.d_in)
    base, finetuned = r0.name, r1.name
    k0 = r0.key(info.name)
    if k0 is None:
        raise InputError(f"module {info.name} of {base} has no weight in its checkpoint")
    if r0.shape(k0, info) != want:
        raise InputError(f"checkpoint of {base} stores {k0} as {r0.stored_shape(k0)}, but its "
                         f"config makes {info.name} {want}")
    k1 = r1.key(info.name)
    if k1 is None:
        raise InputError(f"module {info.name} of {base} is missing from {finetuned}")
    if r1.shape(k1, info) != want:
        raise InputError(f"shape mismatch at {info.name}: base {want}, "
                         f"finetuned {r1.shape(k1, info)}")
    for r, key in ((r0, k0), (r1, k1)):
        if r.dtype(key) not in (None, *FLOATS):
            raise InputError(f"{key} of {r.name} is stored as {r.dtype(key)}, not a float "
                             "type: quantized checkpoints cannot be compared")
    return k0, k1


# ---------------------------------------------------------------------- PEFT adapters

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def pattern_value(pattern: dict, name: str, default):
    """The value of the first key of a peft ``rank_pattern``/``alpha_pattern`` matching ``name``.

    A key matches a module name that equals it or ends with it after a dot, the key read as a
    regular expression (peft's rule).
    """
    for key, value in (pattern or {}).items():
        if key == name or re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_scale(alpha: float, r: int, *, rslora: bool) -> float:
    """s = α/r, or α/√r under rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def read_adapter_config(adapter_dir: Path, *, allow_dora: bool = False) -> dict:
    """The adapter's config, checked to be a LoRA adapter (a DoRA one only with ``allow_dora``).

    Raises:
        InputError: missing/corrupt config, a method other than LoRA, or DoRA when not allowed.
    """
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise InputError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    cfg = read_json_object(path, "adapter config")
    method = str(cfg.get("peft_type", "")).upper()
    if method != "LORA":
        raise InputError(f"adapter {adapter_dir} is of method {cfg.get('peft_type')!r}, not LoRA")
    if cfg.get("use_dora") and not allow_dora:
        raise InputError(f"adapter {adapter_dir} is DoRA, whose update is not s·B·A")
    _check_config_numbers(cfg, path)
    return cfg


def _check_config_numbers(cfg: dict, path: Path) -> None:
    """r, lora_alpha and the patterns' values must be positive numbers; pattern keys valid regexes."""
    def number(value, what):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"adapter config {path}: {what} must be a positive number, got {value!r}")

    number(cfg.get("r", 8), "r")
    number(cfg.get("lora_alpha", 8), "lora_alpha")
    for entry in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(entry) or {}
        if not isinstance(pattern, dict):
            raise InputError(f"adapter config {path}: {entry} must be an object")
        for key, value in pattern.items():
            number(value, f"{entry}[{key!r}]")
            try:
                re.compile(key)
            except re.error as e:
                raise InputError(f"adapter config {path}: {entry} key {key!r} is no regex ({e})") from None


def adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    st = adapter_dir / "adapter_model.safetensors"
    if st.exists():
        return read_tensors(st)[0]
    binf = adapter_dir / "adapter_model.bin"
    if binf.exists():
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
            raise InputError(f"corrupt adapter weights {binf} ({type(e).__name__})") from None
    raise InputError(f"adapter folder {adapter_dir} has no adapter_model.safetensors")


def _pair_factors(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise InputError(f"adapter {where} holds no LoRA weights (lora_A/lora_B)")
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise InputError(f"adapter {where}: module {name} lacks its lora_{missing}")
    return pairs


def from_adapter(adapter_dir: str | Path, *, base: str | Path | None = None,
                 allow_dora: bool = False) -> DeltaSet:
    """ΔW = s·B·A for every module of a PEFT LoRA adapter, kept factored.

    Args:
        adapter_dir: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        base: when given, the base model the adapter must fit (module names and shapes).
        allow_dora: read a DoRA adapter's s·B·A too (``dora.from_dora_adapter`` makes its
            update from them).
    Raises:
        InputError: see ``read_adapter_config``; corrupt weights; a factor whose rank differs
            from the config's; NaN/Inf; a module or shape the base model lacks.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InputError(f"missing adapter folder {adapter_dir}")
    cfg = read_adapter_config(adapter_dir, allow_dora=allow_dora)
    pairs = _pair_factors(adapter_tensors(adapter_dir), adapter_dir)
    parsed = parse_names(sorted(pairs))
    shapes = _base_shapes(base) if base is not None else None
    deltas = []
    for name in sorted(pairs, key=_natural_key):
        A, B = pairs[name]["A"].float(), pairs[name]["B"].float()  # (r, d_in), (d_out, r)
        r = int(pattern_value(cfg.get("rank_pattern"), name, cfg.get("r", 8)))
        alpha = float(pattern_value(cfg.get("alpha_pattern"), name, cfg.get("lora_alpha", 8)))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
            raise InputError(f"adapter {adapter_dir}: {name} has factors {tuple(B.shape)} @ "
                             f"{tuple(A.shape)}, not rank {r} as its config says")
        check_finite(A, what=f"lora_A of {name} in {adapter_dir}")
        check_finite(B, what=f"lora_B of {name} in {adapter_dir}")
        if shapes is not None:
            _check_against_base(name, (B.shape[0], A.shape[1]), shapes, base)
        layer, kind = parsed[name]
        scale = lora_scale(alpha, r, rslora=bool(cfg.get("use_rslora")))
        deltas.append(ModuleDelta(name, layer, kind, B.shape[0], A.shape[1], B=B, A=A, scale=scale))
    meta = {"source": "peft-adapter", "adapter": str(adapter_dir), "base": str(base),
            "lora_alpha": cfg.get("lora_alpha"), "use_rslora": bool(cfg.get("use_rslora")),
            "base_model_name_or_path": cfg.get("base_model_name_or_path")}
    return DeltaSet(adapter_dir.name, "lora", int(cfg.get("r", 8)), None, meta,
                    lambda: iter(deltas), len(deltas))


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _base_shapes(base: str | Path) -> dict[str, tuple[int, int]]:
    """The base model's linear modules and shapes, from its config alone (no weights read)."""
    return {i.name: (i.d_out, i.d_in) for i in find_linear_modules(meta_backbone(base))}


def _check_against_base(name: str, shape: tuple[int, int], shapes: dict, base) -> None:
    hit = match_name(name, shapes.keys())
    if hit is None:
        raise InputError(f"adapter module {name} does not exist in base model {base}")
    if tuple(shape) != shapes[hit]:
        raise InputError(f"adapter module {name} is {tuple(shape)} but base model {base} has "
                         f"{shapes[hit]}: the adapter was made for another model")


# ------------------------------------------------------------------------- run folders

def from_run(run_dir: str | Path) -> DeltaSet:
    """The updates of one finished rankscope run folder (read lazily)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    method = manifest.get("method")
    if method not in ("full", "lora"):
        raise InputError(f"run {run_dir}: unknown method {method!r} in its manifest")

    def load() -> Iterator[ModuleDelta]:
        tensors = TensorFile(run_dir / UPDATES)          # one module's update in memory at a time
        meta = tensors.metadata
        if meta.get("method") not in (None, method):
            raise InputError(f"run {run_dir}: updates are {meta.get('method')}, manifest says {method}")
        for d in run_deltas(tensors, method, run_dir):
            if method == "lora" and manifest.get("rank") not in (None, d.rank):
                raise InputError(f"run {run_dir}: its manifest says rank {manifest.get('rank')!r}, "
                                 f"its factors of {d.name} have rank {d.rank}; the manifest was "
                                 "edited or belongs to another run: remove the folder and rerun")
            yield d

    return DeltaSet(run_dir.name, method, manifest.get("rank"), manifest.get("seed"),
                    manifest, load, manifest.get("n_modules"))


def run_deltas(tensors: dict[str, torch.Tensor], method: str, where: Path) -> Iterator[ModuleDelta]:
    """The ModuleDeltas of an ``updates.safetensors`` layout (a run's, or a snapshot's), in
    module order.

    Raises:
        InputError: no updates of ``method``, missing or mismatched factors, NaN/Inf.
    """
    suffix = ".delta" if method == "full" else ".lora_A"
    names = sorted((k[: -len(suffix)] for k in tensors if k.endswith(suffix)), key=_natural_key)
    if not names:
        raise InputError(f"run {where}: {UPDATES} holds no {method} updates")
    parsed = parse_names(names)
    for name in names:
        layer, kind = parsed[name]
        if method == "full":
            d = tensors[f"{name}.delta"].float()
            check_finite(d, what=f"update {name} in {where}")
            yield ModuleDelta(name, layer, kind, d.shape[0], d.shape[1], dense=d)
            continue
        try:
            A, B = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
            scale = float(tensors[f"{name}.scaling"])
        except KeyError as e:
            raise InputError(f"run {where}: {UPDATES} lacks {e.args[0]}") from None
        if A.shape[0] != B.shape[1]:
            raise InputError(f"run {where}: {name} factors {tuple(B.shape)} @ {tuple(A.shape)} do not chain")
        check_finite(A, what=f"lora_A of {name} in {where}")
        check_finite(B, what=f"lora_B of {name} in {where}")
        yield ModuleDelta(name, layer, kind, B.shape[0], A.shape[1], B=B, A=A, scale=scale,
                          A0=_initial_a(tensors, name, A.shape, where))


def _initial_a(tensors, name: str, shape, where: Path) -> torch.Tensor | None:
    """A at initialisation ("<module>.lora_A0"), or None for runs that did not save it.

    Raises:
        InputError: an A0 of another shape than A, or with NaN/Inf.
    """
    try:    # one read: ``in`` on a TensorFile would read the tensor once more
        a0 = tensors[f"{name}.lora_A0"].float()
    except KeyError:
        return None
    if a0.shape != shape:
        raise InputError(f"run {where}: {name}.lora_A0 is {tuple(a0.shape)}, lora_A {tuple(shape)}")
    check_finite(a0, what=f"lora_A0 of {name} in {where}")
    return a0


def from_runs(path: str | Path) -> list[DeltaSet]:
    """One DeltaSet per finished run under ``path`` (a run folder or a sweep folder)."""
    return [from_run(p) for p in find_runs(path)]


def check_same_setup(sets: list[DeltaSet]) -> None:
    """All runs must share a model, data, held-out set and training length (``SAME_SETUP``),
    else comparisons mean nothing.

    Raises:
        InputError: naming the two runs that differ and the field.
    """
    if not sets:
        raise InputError("no finished runs to compare")
    first = sets[0]
    for s in sets[1:]:
        for key in SAME_SETUP:
            if s.meta.get(key) != first.meta.get(key):
                raise InputError(f"runs {first.run} and {s.run} differ in {key} "
                                 f"({first.meta.get(key)} vs {s.meta.get(key)}): mixed sweeps")
