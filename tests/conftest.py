"""Shared fixtures: tiny real models (slices of the shipped ones) made once per session.

The environment is set before rankscope or transformers is imported: no hub access, and the
converted SmolLM2 cached where every session finds it (~20 s to convert the first time).
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RANKSCOPE_CACHE", str(Path.home() / ".cache" / "rankscope"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The shipped all-MiniLM-L6-v2 folder (BERT, 6 layers, hidden 384)."""
    from rankscope.train.models import resolve_model

    return resolve_model("minilm-l6")


@pytest.fixture(scope="session")
def minilm_slice(tmp_path_factory) -> Path:
    """The first 2 pretrained blocks of MiniLM as a model folder (13 linear modules)."""
    from rankscope.train.models import save_slice

    return save_slice("minilm-l6", tmp_path_factory.mktemp("minilm-slice") / "model", n_layers=2)


@pytest.fixture(scope="session")
def smollm2_slice(tmp_path_factory) -> Path:
    """The first 2 pretrained blocks of SmolLM2-135M as a model folder (14 linear modules)."""
    from rankscope.train.models import save_slice

    return save_slice("smollm2-135m", tmp_path_factory.mktemp("smollm2-slice") / "model",
                      n_layers=2)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 (Conv1D weights stored (d_in, d_out)), saved as a model folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    out = tmp_path_factory.mktemp("tiny-gpt2") / "model"
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 256-token byte-level BPE tokenizer trained on the news corpus (eos = pad = ``<eos>``).

    Small enough that a model's vocabulary projection costs nothing: tiny models on it train
    in milliseconds a step, even under bf16 autocast on a CPU without native bf16.
    """
    from gensim.test.utils import datapath
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = Path(datapath("lee_background.cor")).read_text(encoding="utf-8").splitlines()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<unk>", "<eos>"], show_progress=False))
    out = tmp_path_factory.mktemp("tiny-tokenizer") / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                            pad_token="<eos>").save_pretrained(out)
    return out


def _tiny_model(tokenizer_dir: Path, out: Path, make) -> Path:
    """``make(vocab_size, pad_id)``'s model, drawn from seed 0, saved with the tokenizer."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    make(len(tok), tok.pad_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random 2-block Llama (hidden 32, q/k/v/o and MLP projections) on ``tiny_tokenizer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(vocab, pad):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=None, eos_token_id=pad, pad_token_id=pad, tie_word_embeddings=True))

    return _tiny_model(tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama") / "model", make)


@pytest.fixture(scope="session")
def tiny_bert(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random 2-block BERT encoder (hidden 32) on ``tiny_tokenizer``, for classification."""
    from transformers import BertConfig, BertModel

    def make(vocab, pad):
        return BertModel(BertConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, pad_token_id=pad))

    return _tiny_model(tiny_tokenizer, tmp_path_factory.mktemp("tiny-bert") / "model", make)


# ------------------------------------------------------- builders of inputs with known ΔW

@pytest.fixture(scope="session")
def chosen_factors():
    """``make(s, d_out, d_in, seed=0) -> (B, A)``, float64, with B @ A = U diag(s) Vᵀ.

    U (d_out, k) and V (d_in, k) are random orthonormal, k = len(s): the product's singular
    values are exactly s (and min(d_out, d_in) − k zeros), known by construction.
    """
    import torch

    def make(s, d_out, d_in, *, seed=0):
        gen = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(d_out, len(s), generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d_in, len(s), generator=gen, dtype=torch.float64))
        root = torch.tensor(s, dtype=torch.float64).sqrt()         # (k,)
        return u * root, (v * root).T                              # (d_out, k), (k, d_in)

    return make


def _model_class(model_dir):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    archs = AutoConfig.from_pretrained(model_dir).architectures or []
    return AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel


@pytest.fixture(scope="session")
def make_finetuned():
    """``make(base_dir, out, {module: P}) -> out``: a copy of a model with W += P saved.

    Module names are the backbone's (``layers.0.self_attn.q_proj``) and P is (d_out, d_in) in
    the y = W x orientation, also for Conv1D weights (stored transposed).
    """
    import torch

    from rankscope.train.models import linear_weight, match_name

    def make(base_dir, out, perturb):
        model = _model_class(base_dir).from_pretrained(base_dir)
        names = [n for n, _ in model.named_modules()]
        with torch.no_grad():
            for name, p in perturb.items():
                linear_weight(model.get_submodule(match_name(name, names))).add_(p.float())
        model.save_pretrained(out)
        return out

    return make


@pytest.fixture(scope="session")
def make_adapter():
    """``make(base_dir, out, seed=0, factors=None, **lora_kwargs) -> PeftModel`` saved to ``out``.

    A real peft LoRA adapter on a real model; lora_B (zero at init) is set to seeded random
    values so that ΔW ≠ 0, or, for the modules named in ``factors`` ({module: (B, A)}, module
    names as in the adapter file), to the given factors.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    def make(base_dir, out, *, seed=0, factors=None, **lora_kwargs):
        model = get_peft_model(_model_class(base_dir).from_pretrained(base_dir),
                               LoraConfig(**lora_kwargs))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, mod in model.base_model.model.named_modules():
                if not isinstance(mod, LoraLayer):
                    continue
                lora_a, lora_b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                if factors and name in factors:
                    lora_b.copy_(factors[name][0]), lora_a.copy_(factors[name][1])
                else:
                    lora_b.copy_(torch.randn(lora_b.shape, generator=gen) * 0.1)
        model.save_pretrained(out)
        return model

    return make


@pytest.fixture(scope="session")
def make_run():
    """``make(run_dir, tensors, **manifest) -> run_dir``: a finished rankscope run folder."""
    from rankscope.store.runs import UPDATES, write_manifest, write_updates

    def make(run_dir, tensors, **manifest):
        run_dir.mkdir(parents=True, exist_ok=True)
        write_updates(run_dir / UPDATES, tensors, method=manifest["method"])
        write_manifest(run_dir, {"n_modules": sum(k.endswith((".delta", ".lora_A"))
                                                  for k in tensors), **manifest})
        return run_dir

    return make


# ------------------------------------------------------- a small finished sweep, shared

# bf16 pinned off: tests compare these runs' numbers to float32 tolerances (DDP, truncation,
# resume), and the default would turn bf16 on where the chip has it (or RANKSCOPE_FORCE_BF16=1)
NEWS_TINY = dict(task="news", methods=["full", "lora"], ranks=[2], steps=4, checkpoint_every=2,
                 batch_size=4, max_len=32, max_eval_examples=8, max_train_examples=32, bf16=False)


@pytest.fixture(scope="session")
def news_yaml(smollm2_slice, tmp_path_factory) -> Path:
    """A sweep config file: full and LoRA r=2 on news with the SmolLM2 slice, 4 steps of 4 × 32
    tokens, a checkpoint after step 2 (``rankscope sweep news.yaml --out OUT``)."""
    import yaml

    path = tmp_path_factory.mktemp("news-config") / "news.yaml"
    path.write_text("# rankscope sweep news.yaml --out OUT\n"
                    + yaml.safe_dump({"model": str(smollm2_slice), **NEWS_TINY}))
    return path


@pytest.fixture(scope="session")
def news_sweep(news_yaml, tmp_path_factory):
    """``news_yaml`` run once in this process: out, cfg, manifests, log lines, full and lora dirs.

    Tests read it and may rerun it (finished runs are skipped), but must not change it.
    """
    from types import SimpleNamespace

    from rankscope.train.config import build_sweep
    from rankscope.train.sweep import run_sweep

    out = tmp_path_factory.mktemp("news-sweep") / "sweep"
    cfg = build_sweep(yaml_path=news_yaml)
    lines: list[str] = []
    manifests = run_sweep(cfg, out, progress=False, log=lines.append)
    return SimpleNamespace(out=out, cfg=cfg, manifests=manifests, log=lines,
                           full=out / "full-s0", lora=out / "lora-r2-s0")
