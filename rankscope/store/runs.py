"""The run-folder format that ``rankscope sweep`` writes and every analysis reads.

A run folder ``<sweep>/<method>-r<rank>-s<seed>/`` (``full-s<seed>`` for full fine-tuning):

    config.yaml           the run's configuration
    metrics.jsonl         one JSON object per line: {"step", "kind": "train"|"eval", ...}
    updates.safetensors   full: "<module>.delta" (d_out, d_in) float32 for every linear module;
                          LoRA: "<module>.lora_A" (r, d_in), "<module>.lora_B" (d_out, r) and
                          "<module>.scaling" (a 0-d float32 tensor), ΔW = scaling · B @ A,
                          and "<module>.lora_A0" (r, d_in), A at initialisation;
                          header metadata {"format": "rankscope.updates/1", "method": ...}
    others.safetensors    full only: the final value of every parameter that is not a linear
                          weight of the pretrained backbone (norms, biases, embeddings, a new
                          head), so that W_0 + trunc_k(ΔW) can be rebuilt exactly
    adapter/              LoRA only: the standard PEFT folder (PeftModel.from_pretrained)
    snapshots/            with ``snapshots`` set: ``updates-<step>.safetensors`` (step zero-padded
                          to 6 digits), the update at that step in the layout of
                          updates.safetensors (LoRA without lora_A0), header metadata "step"
    manifest.json         written last, atomically: a folder without it is not a finished run

Besides its setup and provenance, a manifest holds the training evidence:
``"eval_history"`` [{"step", <metric>: value, …}] (step 0 = the base model, ``"late_step"`` —
the step by which the schedule applied 80% of its learning-rate mass —, any ``eval_every``
steps, the last), ``"late_gain_share"`` (the share of the held-out gain made after that step,
null without a gain), ``"delta_fro"`` {module: ‖ΔW‖_F},
``"a_moved"`` {module: ‖A − A₀‖_F / ‖A₀‖_F} (LoRA; null for full) and ``"full_scope"``. A run of
the planted task names its teacher by ``"planted_hash"`` (``tensor_hash`` of the sweep folder's
``planted.safetensors``: ΔW* in the LoRA layout, scaling 1, method "planted").

Module names are those of the trained model (``model.layers.0.self_attn.q_proj``); the base
weights are never copied into a run.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rankscope.errors import InputError
from rankscope.store.atomic import atomic_file, atomic_write_json

RUN_FORMAT = "rankscope.run/1"
UPDATES_FORMAT = "rankscope.updates/1"
MANIFEST = "manifest.json"
UPDATES = "updates.safetensors"
OTHERS = "others.safetensors"
SWEEP_FILE = "sweep.yaml"          # a sweep folder's config, beside its run folders
PLANTED = "planted.safetensors"    # a planted-task sweep's ΔW*, beside its run folders
LR_SEARCH_FILE = "lr_search.json"  # a sweep's learning-rate search, beside its run folders
SNAPSHOTS = "snapshots"            # a run's updates at shares of its steps (config ``snapshots``)
LABELS = "labels.json"             # beside a classification adapter: its head's labels


def sweep_root(runs: str | Path) -> Path:
    """The sweep folder of ``runs`` (a sweep folder, or one run folder inside it)."""
    runs = Path(runs)
    return runs if (runs / SWEEP_FILE).exists() or not (runs / MANIFEST).exists() \
        else runs.parent


def run_name(method: str, rank: int | None, seed: int) -> str:
    """The folder name of one run: ``full-s0`` or ``lora-r8-s0``."""
    return f"full-s{seed}" if method == "full" else f"{method}-r{rank}-s{seed}"


class RunId(NamedTuple):
    """One cell of a sweep's grid: the method, its LoRA rank (None for full) and the seed.

    A tuple, so ``for method, rank, seed in cfg.runs()`` reads it as before.
    """

    method: str
    rank: int | None
    seed: int

    @property
    def name(self) -> str:
        """The run's folder name, ``full-s0`` or ``lora-r8-s0`` (``run_name``)."""
        return run_name(self.method, self.rank, self.seed)


def write_updates(path: str | Path, tensors: dict[str, torch.Tensor], *, method: str,
                  metadata: dict[str, str] | None = None) -> None:
    """Save update tensors to ``path`` as float32 safetensors, atomically.

    Args:
        metadata: more header entries, beside "format" and "method" (strings).
    """
    contiguous = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    with atomic_file(path) as tmp:
        save_file(contiguous, tmp, metadata={**(metadata or {}), "format": UPDATES_FORMAT,
                                             "method": method})


def label_file(names) -> dict:
    """A classification head's labels as transformers' config takes them: ``num_labels``,
    ``id2label``, ``label2id`` (the names in the head's order)."""
    names = [str(n) for n in names]
    return {"num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """Where a run keeps its update at ``step``: ``snapshots/updates-<step:06d>.safetensors``."""
    return Path(run_dir) / SNAPSHOTS / f"updates-{step:06d}.safetensors"


def snapshot_files(run_dir: str | Path) -> dict[int, Path]:
    """{step: file} of a run's saved snapshots, in step order (empty without any)."""
    folder = Path(run_dir) / SNAPSHOTS
    found = {}
    for f in sorted(folder.glob("updates-*.safetensors")) if folder.is_dir() else []:
        digits = f.name.removeprefix("updates-").removesuffix(".safetensors")
        if digits.isdigit():
            found[int(digits)] = f
    return dict(sorted(found.items()))


def tensor_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex digest of tensors: each name, dtype, shape and bytes, in name order.

    Not the hash of a file's bytes: safetensors writes its header metadata in no fixed order,
    so the same tensors saved twice can differ on disk.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the header metadata of a safetensors file.

    Raises:
        InputError: the file is missing, corrupt or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise InputError(f"corrupt or truncated safetensors file {path} ({e})") from None


class TensorFile(Mapping):
    """The tensors of a safetensors file, each read from disk when it is asked for.

    Only the header is read up front, so a caller that walks the keys holds one tensor in
    memory at a time, not the whole file (a full run's ΔW for every module).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"missing file {self.path}")
        with self._open() as f:
            self.metadata = f.metadata() or {}
            self._keys = list(f.keys())

    def _open(self):
        try:
            return safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise InputError(f"corrupt or truncated safetensors file {self.path} ({e})") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        try:
            with self._open() as f:
                return f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise InputError(f"corrupt or truncated safetensors file {self.path} ({e})") from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from an existing file; ``what`` names the file in the error.

    Raises:
        InputError: "corrupt <what> <path>: …" for invalid JSON or UTF-8, or a document that
            is not an object.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt {what} {path}: {e}") from None
    if not isinstance(doc, dict):
        raise InputError(f"corrupt {what} {path}: not a JSON object")
    return doc


def read_manifest(run_dir: str | Path) -> dict:
    """The manifest of a finished run.

    Raises:
        InputError: no manifest (an unfinished run) or one that is not valid JSON.
    """
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{run_dir} is not a finished run (no {MANIFEST})")
    manifest = read_json_object(path, "manifest")
    if manifest.get("format") != RUN_FORMAT:
        raise InputError(f"{path} is not a rankscope run manifest (format {manifest.get('format')!r})")
    return manifest


def write_manifest(run_dir: str | Path, manifest: dict) -> None:
    """Write the manifest last and atomically: from then on the run counts as finished."""
    atomic_write_json(Path(run_dir) / MANIFEST, {"format": RUN_FORMAT, **manifest})


def finished_manifest(run_dir: str | Path) -> dict | None:
    """The manifest of a finished run folder, else None (no folder, or no run manifest yet)."""
    return json.loads((Path(run_dir) / MANIFEST).read_text()) if is_finished(run_dir) else None


def is_finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run manifest, i.e. a finished run.

    An analysis folder inside a sweep also has a manifest.json, of another format: not a run.
    """
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == RUN_FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True     # a corrupt manifest: read_manifest will say so by name


def find_runs(path: str | Path) -> list[Path]:
    """The finished run folders at ``path``: the folder itself, or its sub-folders (a sweep).

    Raises:
        InputError: a missing path, or one with no finished run.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"missing run or sweep folder {path}")
    if is_finished(path):
        return [path]
    runs = sorted(p for p in path.iterdir() if p.is_dir() and is_finished(p))
    if not runs:
        raise InputError(f"no finished runs in {path}")
    return runs
