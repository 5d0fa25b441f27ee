"""DoRA adapters: the effective update rankscope forms against peft's own merged weights."""
from __future__ import annotations

import pytest
import torch

from rankscope import analyze
from rankscope.analysis.deltas import from_adapter
from rankscope.analysis.dora import dora_update, from_dora_adapter, from_peft_adapter
from rankscope.errors import InputError


@pytest.fixture
def dora(minilm_slice, make_adapter, tmp_path):
    """A real peft DoRA adapter on MiniLM's first 2 blocks, its B and magnitudes moved off
    their initial values, and the weights peft merges from it."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    model = make_adapter(minilm_slice, tmp_path / "dora", r=4, lora_alpha=8,
                         target_modules=["query", "value"], use_dora=True)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.base_model.model.modules():
            if isinstance(mod, LoraLayer):
                m = mod.lora_magnitude_vector["default"].weight
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen))
    model.save_pretrained(tmp_path / "dora")
    base = AutoModel.from_pretrained(minilm_slice)
    merged = model.merge_and_unload()
    return tmp_path / "dora", base, merged


def test_the_update_equals_peft_merged_weights_minus_the_base(dora, minilm_slice):
    adapter, base, merged = dora
    ds = from_peft_adapter(adapter, base=str(minilm_slice))
    assert ds.method == "dora" and ds.rank == 4
    updates = list(ds)
    assert [d.name for d in updates] == [f"encoder.layer.{i}.attention.self.{m}"
                                         for i in (0, 1) for m in ("query", "value")]
    sba = {d.name: d.materialize() for d in from_adapter(adapter, allow_dora=True)}
    for d in updates:
        want = (merged.get_submodule(d.name).weight - base.get_submodule(d.name).weight).detach()
        assert not d.factored
        torch.testing.assert_close(d.materialize(), want, rtol=0, atol=2e-6)
        # and it is not s·B·A: DoRA's magnitudes rescale the rows of W0 too
        assert float((want - sba[d.name]).norm()) > 0.1 * float(want.norm())


def test_analyze_labels_dora_rows(dora, minilm_slice):
    adapter, _, _ = dora
    spectra, modules = analyze(adapter=adapter, base=str(minilm_slice), progress=False)
    assert set(modules["method"]) == {"dora"} and set(modules["rank"]) == {4}
    assert spectra.groupby("name").size().eq(384).all()     # dense: every singular value
    assert (modules["energy_rank_90"] > 4).any()            # m rescales W0's rows: not rank 4


def test_dora_needs_its_base_and_every_magnitude(dora, tmp_path):
    adapter, _, _ = dora
    with pytest.raises(InputError, match="is DoRA: its update needs the base weights W0, give --base"):
        from_dora_adapter(adapter, base=None)
    with pytest.raises(InputError, match="missing adapter folder"):
        from_peft_adapter(tmp_path / "nowhere")


def test_dora_update_by_its_definition():
    """m ⊙ (W0 + sBA)/‖W0 + sBA‖_row − W0 on numbers worked by hand."""
    W0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    B, A = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0, 1.0]])   # sBA = [[0, 0], [0, 2]]
    m = torch.tensor([10.0, 1.0])
    got = dora_update(W0, B, A, scale=2.0, magnitude=m)
    row1 = torch.tensor([1.0, 2.0]) / 5 ** 0.5
    torch.testing.assert_close(got, torch.stack([torch.tensor([6.0, 8.0]), row1]) - W0)
    with pytest.raises(InputError, match="magnitude of shape"):
        dora_update(W0, B, A, scale=2.0, magnitude=torch.ones(3))
    with pytest.raises(InputError, match="do not fit"):
        dora_update(W0, B.T, A, scale=2.0, magnitude=m)
    with pytest.raises(InputError, match="a row of W0 "):
        dora_update(torch.zeros(2, 2), B * 0, A, scale=1.0, magnitude=m)
