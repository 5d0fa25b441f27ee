"""rankscope's measures against independent implementations of the same definitions, on a real
PEFT adapter of MiniLM: peft's own intruder-dimension utility (Shuttleworth et al. 2024)."""
from __future__ import annotations

import re

import torch

from rankscope.analysis.deltas import from_adapter
from rankscope.linalg.subspace import count_intruders

# per module: the singular values of the planted ΔW = s·B·A (‖W‖₂ of MiniLM's query/value is
# ≈ 3–6): large ones bring new top directions (intruders), tiny ones none
PLANTED = {"encoder.layer.0.attention.self.query": [40.0, 30.0, 20.0, 10.0],
           "encoder.layer.0.attention.self.value": [1e-3, 1e-3, 1e-3, 1e-3],
           "encoder.layer.1.attention.self.query": [25.0, 0.0, 0.0, 0.0],
           "encoder.layer.1.attention.self.value": [60.0, 50.0, 0.0, 0.0]}


def test_intruder_counts_equal_peft_reduce_intruder_dimension(minilm_slice, make_adapter,
                                                              chosen_factors, tmp_path):
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModel

    scale = 8 / 4
    factors = {}
    for i, (name, s) in enumerate(PLANTED.items()):
        B, A = chosen_factors(s, 384, 384, seed=i)
        factors[name] = (B / scale, A)
    model = make_adapter(minilm_slice, tmp_path / "adapter", r=4, lora_alpha=8,
                         target_modules=["query", "value"], factors=factors)
    logged: list[str] = []
    reduce_intruder_dimension(model, top_k=10, threshold_epsilon=0.5, logging_sink=logged.append)
    theirs = {}
    for line in logged:                   # "<layer>: Intruders: n" or "<layer>: No intruders"
        hit = re.match(r"(?:base_model\.model\.)?(.+): (?:Intruders: (\d+)|No intruders)$", line)
        if hit:
            theirs[hit.group(1)] = int(hit.group(2) or 0)
    assert len(theirs) == 4, logged

    base = AutoModel.from_pretrained(minilm_slice)
    ours = {}
    for d in from_adapter(tmp_path / "adapter"):
        w0 = base.get_submodule(d.name).weight.detach().double()
        ours[d.name] = count_intruders(w0, w0 + d.materialize(torch.float64), k=10,
                                       eps_values=(0.5,))[0.5]
    assert ours == theirs
    assert ours["encoder.layer.0.attention.self.value"] == 0      # a tiny ΔW: none
    assert ours["encoder.layer.0.attention.self.query"] >= 1      # a large one: some


def test_energy_ranks_equal_the_cutoff_of_peft_conversion():
    """k_τ against peft's ``_find_cutoff_index`` (the energy cutoff its LoRA conversion uses:
    the smallest k whose σ² hold a share τ), on seeded random and decaying spectra."""
    from peft.tuners.lora.conversion import _find_cutoff_index

    from rankscope.linalg.spectra import rank_at_energy

    gen = torch.Generator().manual_seed(0)
    spectra = [torch.linalg.svdvals(torch.randn(64, 48, generator=gen, dtype=torch.float64))
               for _ in range(20)]
    spectra += [torch.arange(1, 101, dtype=torch.float64) ** -p for p in (0.3, 0.7, 1.0, 2.0)]
    tried = 0
    for s in spectra:
        for tau in (0.5, 0.8, 0.9, 0.95, 0.99):
            assert rank_at_energy(s, tau) == _find_cutoff_index(s, tau), (tau, s[:3])
            tried += 1
    assert tried == 120
