"""Tests of rankscope.store.checkpoint: a model folder's safetensors, single file or sharded.

The folders are real ``save_pretrained`` output of a tiny random Llama; safetensors' own
``load_file`` of every file is the reference for keys, shapes, dtypes and values.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rankscope.errors import InputError
from rankscope.store.checkpoint import INDEX, SINGLE, Checkpoint, has_safetensors, shard_map


def _save_tiny_llama(out: Path, *, max_shard_size: str = "50GB", dtype=torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    logging.disable_progress_bar()
    LlamaForCausalLM(config).to(dtype).save_pretrained(out, max_shard_size=max_shard_size)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {"single": _save_tiny_llama(root / "single"),
            "sharded": _save_tiny_llama(root / "sharded", max_shard_size="20KB"),
            "bf16": _save_tiny_llama(root / "bf16", max_shard_size="20KB", dtype=torch.bfloat16)}


@pytest.fixture
def sharded(folders, tmp_path) -> Path:
    """A private copy of the sharded folder, for tests that damage it."""
    import shutil

    return Path(shutil.copytree(folders["sharded"], tmp_path / "sharded"))


def _reference(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize("layout", ["single", "sharded", "bf16"])
def test_every_tensor_as_safetensors_reads_it(layout, folders):
    folder = folders[layout]
    ref = _reference(folder)
    ck = Checkpoint(folder)
    assert set(ck) == set(ref) and len(ck) == len(ref) == 21      # 2 × 9 + embed, norm, lm_head
    assert "model.layers.1.self_attn.q_proj.weight" in ck
    names = {"float32": "F32", "bfloat16": "BF16"}
    for key, t in ref.items():
        assert ck.shape(key) == tuple(t.shape)
        assert ck.dtype(key) == names[str(t.dtype).removeprefix("torch.")]
        got = ck[key]
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_layouts_and_the_shard_map(folders):
    assert not (folders["single"] / INDEX).exists() and (folders["single"] / SINGLE).is_file()
    assert not (folders["sharded"] / SINGLE).exists() and (folders["sharded"] / INDEX).is_file()
    shards = shard_map(folders["sharded"])
    assert len(set(shards.values())) > 2                            # really sharded
    index = json.loads((folders["sharded"] / INDEX).read_text())["weight_map"]
    assert {k: p.name for k, p in shards.items()} == index
    assert len(Checkpoint(folders["sharded"]).files) == len(set(index.values()))
    assert has_safetensors(folders["single"]) and has_safetensors(folders["sharded"])


def test_a_folder_without_safetensors(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert not has_safetensors(tmp_path)
    with pytest.raises(InputError, match=f"has no {SINGLE} or {INDEX}"):
        Checkpoint(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_no_file_stays_mapped_between_reads(folders):
    """A map left open would keep every page read through it resident: none may remain."""
    def mapped() -> bool:
        text = Path("/proc/self/maps").read_text()
        return any(str(f) in text for f in folders["sharded"].glob("*.safetensors"))

    ck = Checkpoint(folders["sharded"])
    norms = [float(ck[key].norm()) for key in ck]                  # each tensor dropped at once
    assert len(norms) == 21 and not mapped()


def test_unknown_key(folders):
    with pytest.raises(KeyError):
        Checkpoint(folders["single"])["nope"]


# ------------------------------------------------------------------------------ errors

def _one_line(match: str, folder: Path) -> InputError:
    with pytest.raises(InputError, match=match) as e:
        Checkpoint(folder)
    assert "\n" not in str(e.value)
    return e.value


def test_a_shard_named_by_the_index_is_missing(sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    _one_line(f"missing shard {shard} named by {sharded / INDEX}", sharded)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_a_corrupt_shard(how, sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes({"truncated": data[: len(data) - 100], "empty": b"",
                       "garbage": bytes(range(256)) * 40}[how])
    _one_line(f"corrupt or truncated safetensors file {shard}", sharded)


def test_a_truncated_single_file(folders, tmp_path):
    import shutil

    folder = Path(shutil.copytree(folders["single"], tmp_path / "single"))
    data = (folder / SINGLE).read_bytes()
    (folder / SINGLE).write_bytes(data[: len(data) // 2])
    _one_line(f"corrupt or truncated safetensors file {folder / SINGLE}", folder)


@pytest.mark.parametrize("text, message", [
    ("{not json", "corrupt safetensors index"),
    ('{"metadata": {}}', "no weight_map"),
    ('{"weight_map": {"a.weight": 3}}', "no weight_map"),
    ('{"weight_map": {"a.weight": "../model.safetensors"}}', "is not a file name in its folder"),
])
def test_a_corrupt_index(text, message, sharded):
    (sharded / INDEX).write_text(text)
    _one_line(message, sharded)


def test_a_shard_that_lacks_a_key_its_index_places_there(sharded):
    index = json.loads((sharded / INDEX).read_text())
    key = "model.layers.0.mlp.up_proj.weight"
    shard = sharded / index["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    _one_line(f"shard {shard} lacks tensor {key}", sharded)
