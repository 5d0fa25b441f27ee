"""End-to-end tests of rankscope.analyze on updates whose spectrum is chosen by construction.

Each source (a real peft adapter, a run or sweep folder, a model pair of real model slices)
holds ΔW = U diag(s) Vᵀ with s chosen here; the CSVs that ``analyze`` writes must give back s
and the effective ranks that follow from s by their definitions (docs/science.md).
"""
from __future__ import annotations

import importlib.metadata
import json
import math

import pandas as pd
import pytest
import torch

from rankscope import analyze as analyze
from rankscope.analysis.analyze import resolve_sources
from rankscope.analysis.decompose import update_svd
from rankscope.analysis.deltas import ModuleDelta
from rankscope.analysis.tables import FLOOR_COLS, ID_COLS, METRIC_COLS, SVD_COL, summary
from rankscope.errors import InputError


def expected_metrics(s: list[float]) -> dict:
    """The effective-rank measures of a spectrum, straight from their definitions."""
    s = sorted((x for x in s if x > 0), reverse=True)
    energy = [x * x for x in s]
    total = sum(energy)

    def k(tau):
        return next(i + 1 for i in range(len(s)) if sum(energy[: i + 1]) / total >= tau)

    p = [x / sum(s) for x in s]
    return {"fro_norm": math.sqrt(total), "spectral_norm": s[0], "stable_rank": total / s[0] ** 2,
            "entropy_rank": math.exp(-sum(q * math.log(q) for q in p)),
            "energy_rank_50": k(0.5), "energy_rank_90": k(0.9), "energy_rank_99": k(0.99),
            "numerical_rank": len(s)}


def check_module(spectra: pd.DataFrame, modules: pd.DataFrame, name: str, s: list[float],
                 *, n_sigma: int, atol: float = 1e-5, rel_entropy: float = 1e-5):
    """σ of ``name`` are s then zeros (n_sigma in all), and its metrics are those of s.

    ``rel_entropy`` loosens the entropy rank alone: p_i = σ_i / Σσ_j sums the float32 rounding
    noise of all n_sigma "zero" values (~1e-6 each) of a dense ΔW = W_ft − W_0.
    """
    sigma = spectra.loc[spectra["name"] == name].sort_values("index")
    assert sigma["index"].tolist() == list(range(n_sigma))
    chosen = torch.zeros(n_sigma, dtype=torch.float64)
    chosen[: len(s)] = torch.tensor(s, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(sigma["sigma"].to_numpy()), chosen, rtol=0, atol=atol)
    row = modules.loc[modules["name"] == name].iloc[0]
    for metric, value in expected_metrics(s).items():
        rel = rel_entropy if metric == "entropy_rank" else 1e-5
        assert row[metric] == pytest.approx(value, rel=rel), metric


def read_out(out) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "modules.csv", "spectra.csv"]
    return (pd.read_csv(out / "spectra.csv"), pd.read_csv(out / "modules.csv"),
            json.loads((out / "manifest.json").read_text()))


# --------------------------------------------------------------- the adapter form

ADAPTER_SPECTRA = {   # none sits on an energy-share boundary (rounding could tip it)
    "encoder.layer.0.attention.self.query": [4.0, 2.0, 1.0, 0.5],
    "encoder.layer.0.attention.self.value": [3.0, 1.5],           # rank 2 < r = 4
    "encoder.layer.1.attention.self.query": [2.0, 2.0, 2.0, 1.0],
    "encoder.layer.1.attention.self.value": [2.0],
}


def test_adapter_with_chosen_spectrum(minilm_slice, make_adapter, chosen_factors, tmp_path):
    scale = 8 / 4                                                      # α / r
    factors = {}
    for i, (name, s) in enumerate(ADAPTER_SPECTRA.items()):
        B, A = chosen_factors(s + [0.0] * (4 - len(s)), 384, 384, seed=i)
        factors[name] = (B / scale, A)                                 # ΔW = scale·B·A = U S Vᵀ
    make_adapter(minilm_slice, tmp_path / "adapter", r=4, lora_alpha=8,
                 target_modules=["query", "value"], factors=factors)
    analyze(adapter=tmp_path / "adapter", base=str(minilm_slice), out=tmp_path / "out",
            progress=False)
    spectra, modules, manifest = read_out(tmp_path / "out")
    assert list(spectra.columns) == ID_COLS + ["index", "sigma"]
    assert list(modules.columns) == ID_COLS + ["d_out", "d_in"] + METRIC_COLS + [SVD_COL] + FLOOR_COLS
    for name, s in ADAPTER_SPECTRA.items():
        check_module(spectra, modules, name, s, n_sigma=4)
    assert set(modules["run"]) == {"adapter"} and set(modules["method"]) == {"lora"}
    assert set(modules["rank"]) == {4} and modules["seed"].isna().all()
    assert modules[["layer", "module"]].values.tolist() == [
        [0, "query"], [0, "value"], [1, "query"], [1, "value"]]
    assert manifest["sources"] == [{"run": "adapter", "method": "lora", "rank": 4, "seed": None}]
    assert manifest["inputs"] == {"base": str(minilm_slice), "adapter": str(tmp_path / "adapter")}


# ----------------------------------------------------------- the run-folder form

def _lora_run(make_run, chosen_factors, run_dir, spectra: dict, *, scale=2.0, r=4, seed=0):
    tensors = {}
    for i, (name, s) in enumerate(spectra.items()):
        B, A = chosen_factors(s + [0.0] * (r - len(s)), 48, 32, seed=i)
        tensors |= {f"{name}.lora_A": A, f"{name}.lora_B": B / scale,
                    f"{name}.scaling": torch.tensor(scale)}
    return make_run(run_dir, tensors, method="lora", rank=r, seed=seed)


def _full_run(make_run, chosen_factors, run_dir, spectra: dict, *, seed=0):
    tensors = {f"{name}.delta": torch.matmul(*chosen_factors(s, 48, 32, seed=i))   # (48, 32)
               for i, (name, s) in enumerate(spectra.items())}
    return make_run(run_dir, tensors, method="full", rank=None, seed=seed)


RUN_SPECTRA = {"model.layers.0.self_attn.q_proj": [4.0, 2.0, 1.0, 0.5],
               "model.layers.0.self_attn.v_proj": [3.0, 1.5],
               "model.layers.1.self_attn.q_proj": [5.0, 3.0, 1.0],
               "model.layers.1.self_attn.v_proj": [1.0]}


def test_run_folder_lora(make_run, chosen_factors, tmp_path):
    run = _lora_run(make_run, chosen_factors, tmp_path / "lora-r4-s3", RUN_SPECTRA, seed=3)
    analyze(run, out=tmp_path / "out", progress=False)
    spectra, modules, _ = read_out(tmp_path / "out")
    for name, s in RUN_SPECTRA.items():
        check_module(spectra, modules, name, s, n_sigma=4)
    assert modules[["run", "method", "rank", "seed"]].drop_duplicates().values.tolist() == [
        ["lora-r4-s3", "lora", 4, 3]]


def test_run_folder_full(make_run, chosen_factors, tmp_path):
    run = _full_run(make_run, chosen_factors, tmp_path / "full-s0", RUN_SPECTRA)
    spectra, modules = analyze(run, progress=False)
    for name, s in RUN_SPECTRA.items():
        check_module(spectra, modules, name, s, n_sigma=32)            # min(d_out, d_in) values
    assert modules["rank"].isna().all() and set(modules["method"]) == {"full"}
    assert set(modules["d_out"]) == {48} and set(modules["d_in"]) == {32}


def test_sweep_folder_with_full_and_lora(make_run, chosen_factors, tmp_path):
    sweep = tmp_path / "sweep"
    _full_run(make_run, chosen_factors, sweep / "full-s0", RUN_SPECTRA)
    _lora_run(make_run, chosen_factors, sweep / "lora-r4-s0", RUN_SPECTRA)
    _lora_run(make_run, chosen_factors, sweep / "lora-r8-s1", RUN_SPECTRA, r=8, seed=1)
    (sweep / "lora-r16-s0").mkdir()                                    # unfinished: skipped
    analyze(sweep, out=tmp_path / "out", progress=False)
    spectra, modules, manifest = read_out(tmp_path / "out")
    assert [s["run"] for s in manifest["sources"]] == ["full-s0", "lora-r4-s0", "lora-r8-s1"]
    ids = modules.groupby("run")[["method", "rank", "seed"]].first()
    assert ids.loc["full-s0", "method"] == "full" and pd.isna(ids.loc["full-s0", "rank"])
    assert ids.loc["lora-r8-s1"].tolist() == ["lora", 8, 1]
    assert spectra.groupby("run").size().to_dict() == {"full-s0": 4 * 32, "lora-r4-s0": 4 * 4,
                                                       "lora-r8-s1": 4 * 8}
    for run in ids.index:
        for name, s in RUN_SPECTRA.items():
            n = {"full-s0": 32, "lora-r4-s0": 4, "lora-r8-s1": 8}[run]
            check_module(spectra[spectra["run"] == run], modules[modules["run"] == run], name, s,
                         n_sigma=n)


# --------------------------------------------------------------- the model-pair form

PAIR_SPECTRA = {
    "minilm_slice": {"encoder.layer.0.output.dense": (384, 1536, [2.0, 0.5]),
                     "encoder.layer.1.attention.self.query": (384, 384, [3.0, 2.0, 1.0])},
    "smollm2_slice": {"layers.0.self_attn.k_proj": (192, 576, [1.5, 1.0]),
                      "layers.1.mlp.down_proj": (576, 1536, [4.0, 2.0, 1.0, 0.5])},
}


@pytest.mark.parametrize("model", list(PAIR_SPECTRA))
def test_model_pair_recovers_the_perturbation(model, request, make_finetuned, chosen_factors,
                                              tmp_path):
    base = request.getfixturevalue(model)
    chosen = PAIR_SPECTRA[model]
    perturb = {name: torch.matmul(*chosen_factors(s, d_out, d_in, seed=i))
               for i, (name, (d_out, d_in, s)) in enumerate(chosen.items())}
    finetuned = make_finetuned(base, tmp_path / "finetuned", perturb)
    analyze(base=str(base), finetuned=str(finetuned), out=tmp_path / "out", progress=False)
    spectra, modules, manifest = read_out(tmp_path / "out")
    assert modules["name"].tolist() == list(chosen)      # in model order; unchanged ones skipped
    for name, (d_out, d_in, s) in chosen.items():
        check_module(spectra, modules, name, s, n_sigma=min(d_out, d_in), rel_entropy=2e-3)
    assert set(modules["method"]) == {"full"} and modules["rank"].isna().all()
    assert manifest["sources"] == [{"run": "finetuned", "method": "full", "rank": None,
                                    "seed": None}]


def test_model_pair_without_changes(minilm_slice):
    with pytest.raises(InputError, match="every ΔW is zero"):
        analyze(base=str(minilm_slice), finetuned=str(minilm_slice), progress=False)


# ------------------------------------------------------------------- options, outputs

def test_float64_and_manifest(make_run, chosen_factors, tmp_path):
    run = _full_run(make_run, chosen_factors, tmp_path / "full-s0", RUN_SPECTRA)
    s32, _ = analyze(run, progress=False)
    s64, _ = analyze(run, float64=True, out=tmp_path / "out", progress=False)
    torch.testing.assert_close(torch.tensor(s64["sigma"].to_numpy()),
                               torch.tensor(s32["sigma"].to_numpy()), rtol=0, atol=1e-5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["svd_dtype"] == "float64" and manifest["device"] == "cpu"
    assert manifest["inputs"] == {"runs": str(run)}
    assert {"versions", "git", "time", "machine"} <= set(manifest)
    assert manifest["versions"]["torch"] == importlib.metadata.version("torch")


def test_update_svd_dtypes():
    B, A = torch.ones(5, 1), torch.ones(1, 3)
    factored = ModuleDelta("x", 0, "x", 5, 3, B=B, A=A, scale=2.0)
    s = update_svd(factored, compute_uv=False)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s, torch.tensor([2 * math.sqrt(15)], dtype=torch.float64))
    dense = ModuleDelta("x", 0, "x", 5, 3, dense=(B @ A).bfloat16())
    s = update_svd(dense, compute_uv=False)
    assert s.dtype == torch.float32                                      # never the bf16 input's
    assert update_svd(dense, compute_uv=False, dtype=torch.float64).dtype == torch.float64
    for delta in (factored, dense):                                      # never in bf16
        with pytest.raises(InputError, match="float32 or float64"):
            update_svd(delta, dtype=torch.bfloat16)


def test_update_svd_is_exact_for_factors_and_dense_alike(chosen_factors):
    """One update as LoRA factors and as the dense matrix: the same spectrum and ΔW, wide or tall."""
    for d_out, d_in in ((24, 40), (40, 24)):
        B, A = chosen_factors([3.0, 2.0, 0.5], d_out, d_in, seed=d_out)
        factored = ModuleDelta("x", 0, "x", d_out, d_in, B=B / 2, A=A, scale=2.0)
        dense = ModuleDelta("x", 0, "x", d_out, d_in, dense=B @ A)
        for delta, atol in ((factored, 1e-12), (dense, 1e-5)):
            U, S, Vh = update_svd(delta, dtype=torch.float64 if delta.factored else torch.float32)
            assert U.shape == (d_out, S.numel()) and Vh.shape == (S.numel(), d_in)
            torch.testing.assert_close(S[:3].double(), torch.tensor([3.0, 2.0, 0.5],
                                                                    dtype=torch.float64),
                                       rtol=0, atol=atol)
            torch.testing.assert_close(((U * S) @ Vh).double(), B @ A, rtol=0, atol=atol)


def test_summary_medians_over_layers(make_run, chosen_factors, tmp_path):
    run = _lora_run(make_run, chosen_factors, tmp_path / "lora-r4-s0", RUN_SPECTRA)
    _, modules = analyze(run, progress=False)
    table = summary(modules)
    assert table[["run", "module", "layers"]].values.tolist() == [
        ["lora-r4-s0", "q_proj", 2], ["lora-r4-s0", "v_proj", 2]]
    q = table.set_index("module").loc["q_proj"]
    assert q["energy_rank_90"] == pytest.approx((2 + 2) / 2)            # k90 of both q spectra
    assert q["stable_rank"] == pytest.approx(
        (expected_metrics(RUN_SPECTRA["model.layers.0.self_attn.q_proj"])["stable_rank"]
         + expected_metrics(RUN_SPECTRA["model.layers.1.self_attn.q_proj"])["stable_rank"]) / 2)


def test_progress_goes_to_stderr_only_when_asked(make_run, chosen_factors, tmp_path, capsys):
    run = _lora_run(make_run, chosen_factors, tmp_path / "lora-r4-s0", RUN_SPECTRA)
    analyze(run, progress=False)
    assert capsys.readouterr() == ("", "")
    analyze(run, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "analyze" in err and "4/4" in err


def test_out_folder_rules(make_run, chosen_factors, tmp_path):
    run = _lora_run(make_run, chosen_factors, tmp_path / "lora-r4-s0", RUN_SPECTRA)
    out = tmp_path / "out"
    out.mkdir()
    analyze(run, out=out, progress=False)                               # empty folder: fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists with other content"):
        analyze(run, out=out, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    analyze(run, out=out, overwrite=True, progress=False)               # replaced as a whole
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "modules.csv", "spectra.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-r4-s0", "out"]   # no leftovers
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        analyze(run, out=tmp_path / "file", progress=False)


@pytest.mark.parametrize("where", ["same", "parent"])
def test_out_folder_that_holds_the_input_is_refused(where, make_run, chosen_factors, tmp_path):
    run = _lora_run(make_run, chosen_factors, tmp_path / "sweep" / "lora-r4-s0", RUN_SPECTRA)
    out = run if where == "same" else tmp_path / "sweep"
    with pytest.raises(InputError, match="is or holds the input"):
        analyze(run, out=out, overwrite=True, progress=False)
    assert (run / "updates.safetensors").is_file()


def test_failed_analysis_writes_nothing(make_run, tmp_path):
    run = make_run(tmp_path / "full-s0", {"layers.0.q.delta": torch.ones(4, 4),
                                          "layers.1.q.delta": torch.full((4, 4), math.nan)},
                   method="full", rank=None, seed=0)
    with pytest.raises(InputError, match="layers.1.q .*NaN or Inf"):
        analyze(run, out=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full-s0"]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "nothing to analyze"),
    ({"runs": "r", "adapter": "a"}, "not several"),
    ({"runs": "r", "finetuned": "f"}, "not several"),
    ({"adapter": "a", "finetuned": "f"}, "not both"),
    ({"finetuned": "f"}, "needs --base"),
])
def test_resolve_sources_forms(kwargs, message):
    with pytest.raises(InputError, match=message):
        resolve_sources(**kwargs)


# ------------------------------------------------------------------- top-k SVDs

FLAT = [3.5] + [1.0] * 19         # k₅₀ = 5, k₉₀ = 17: beyond a top-8 SVD


def test_topk_svd_gives_the_exact_ranks_it_reaches_and_no_others(make_run, chosen_factors,
                                                                   tmp_path):
    spectra_in = {**RUN_SPECTRA, "model.layers.2.self_attn.q_proj": FLAT}
    run = _full_run(make_run, chosen_factors, tmp_path / "full-s0", spectra_in)
    _, exact = analyze(run, svd="exact", progress=False)
    analyze(run, svd="topk:8", out=tmp_path / "out", progress=False)
    spectra, top, manifest = read_out(tmp_path / "out")
    assert manifest["svd"] == "topk:8"
    assert spectra.groupby("name").size().eq(8).all()                # the top 8 values only
    assert top[SVD_COL].eq(8).all() and top["entropy_rank"].isna().all()
    assert top["gd_rank"].isna().all()
    exact, top = exact.set_index("name"), top.set_index("name")
    for name in RUN_SPECTRA:                                         # ≤ 4 non-zero σ: reached
        for col in ("fro_norm", "spectral_norm", "stable_rank"):
            assert top.loc[name, col] == pytest.approx(exact.loc[name, col], rel=1e-4), col
        for col in ("energy_rank_50", "energy_rank_90", "energy_rank_99", "energy_rank_90_noise"):
            assert top.loc[name, col] == exact.loc[name, col], col
    flat = top.loc["model.layers.2.self_attn.q_proj"]
    assert flat["energy_rank_50"] == 5 and pd.isna(flat["energy_rank_90"])
    assert exact.loc["model.layers.2.self_attn.q_proj", "energy_rank_90"] == 17
    table = summary(top.reset_index()).set_index("module")          # layers 0, 1, 2 of q_proj
    assert table.loc["q_proj", "energy_rank_90"] == 2.0              # 2, 2, "> 8": median 2
    top.loc["model.layers.0.self_attn.q_proj", "energy_rank_90"] = pd.NA
    table = summary(top.reset_index()).set_index("module")
    assert table.loc["q_proj", "energy_rank_90"] == "> 8"            # 2 of 3 beyond 8


def test_censored_median():
    from rankscope.analysis.tables import censored_median

    def med(values, bounds):
        return censored_median(pd.Series(values, dtype="Float64"),
                               pd.Series(bounds, dtype="Int64"))

    assert med([3, 5, 9], [None, None, None]) == 5
    assert med([3, None, 9, 4], [8, 8, 8, 8]) == pytest.approx((4 + 9) / 2)   # None is > 8
    assert med([3, None, None, 4], [8, 8, 16, 8]) == "> 8"
    assert med([None], [None]) is None
