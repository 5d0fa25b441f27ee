"""Peak memory of reading a model pair's ΔW: streamed from safetensors vs both models loaded whole.

Run: python benchmarks/stream.py [--model smollm2-135m] [--shard 100MB] [--layers N] [--no-write]

The pair: the model (default SmolLM2-135M, float32) loaded once and saved as the base with
``max_shard_size=--shard`` (several shard files and an index), then every linear weight
perturbed by a small seeded rank-4 update and saved the same way as the fine-tuned model,
both in a temporary folder. With ``--layers N`` the pair has the model's architecture with N
blocks instead (its config, random weights from a fixed seed): SmolLM2's 30 blocks × 4 = 120
make one model ~1.8 GB, to show how the ratio falls as the checkpoint grows. Each measurement runs in a fresh process, so each peak is that
process's own ``ru_maxrss`` (resident pages, memory-mapped file pages included). Linux carries a
parent's peak into the ``ru_maxrss`` of a child it starts, so the parent stays light: the pair
is made in a subprocess too, and torch is imported here only after the measurements.
  a. baseline: the interpreter and ``import torch, transformers, rankscope.analysis.deltas``;
  a′. the baseline plus the architecture's code: ``meta_backbone(base)`` (the modules of the
     base built on the meta device), which imports transformers' modelling code (modeling_utils,
     torch._dynamo, the model's module): a fixed cost, whatever the model's size, that (b) and
     (c) both pay;
  b. streamed: that, then every ΔW of ``from_model_pair(base, ft)`` (its Frobenius norm taken,
     the matrix dropped);
  c. whole models: the same loop on the whole-model path (the fallback for folders without
     safetensors, forced here), which loads both models first.
The ratio is (b − a) / the checkpoint size of one model. Target: < 25%. The last column,
(peak − a′) / size, is what streaming itself costs beyond that fixed code.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))   # this checkout's rankscope, whatever else is installed
RESULTS = HERE / "RESULTS.md"
TARGET = 0.25
MODES = {"baseline": "a. baseline (imports only)", "code": "a′. baseline + meta_backbone(base)",
         "streamed": "b. streamed from_model_pair", "whole": "c. whole-model path"}


# -------------------------------------------------------------------------- the pair

def make_pair(model: str, out: Path, *, shard: str, layers: int | None = None, rank: int = 4,
              seed: int = 0) -> tuple[Path, Path]:
    """Save ``model`` (or its architecture with ``layers`` blocks, random weights) as
    ``out/base`` and a low-rank-perturbed copy as ``out/ft``, sharded."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging

    from rankscope.train.models import (find_linear_modules, is_causal_lm, linear_weight,
                                        load_pretrained, resolve_model)

    logging.disable_progress_bar()
    path = resolve_model(model)
    auto = AutoModelForCausalLM if is_causal_lm(path) else AutoModel
    if layers is None:
        full = load_pretrained(auto, path)
    else:
        config = AutoConfig.from_pretrained(path)
        config.num_hidden_layers = layers
        torch.manual_seed(seed)
        full = auto.from_config(config)
    full.save_pretrained(out / "base", max_shard_size=shard)
    backbone, gen = full.base_model, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for info in find_linear_modules(backbone):
            B = torch.randn(info.d_out, rank, generator=gen)             # (d_out, r)
            A = torch.randn(rank, info.d_in, generator=gen)              # (r, d_in)
            linear_weight(backbone.get_submodule(info.name)).add_(1e-3 * B @ A / info.d_in**0.5)
    full.save_pretrained(out / "ft", max_shard_size=shard)
    return out / "base", out / "ft"


def checkpoint_bytes(folder: Path) -> int:
    """The size of a model folder's safetensors files."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ------------------------------------------------------------------- one measurement

def worker(mode: str, base: str, ft: str) -> dict:
    """Run one mode in this (fresh) process; its peak RSS, seconds and the ΔW (or module) count."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import rankscope.analysis.deltas as deltas

    start, n, norm2 = time.perf_counter(), 0, 0.0
    if mode == "code":
        from rankscope.train.models import find_linear_modules, meta_backbone

        n = len(find_linear_modules(meta_backbone(base)))
    elif mode != "baseline":
        if mode == "whole":                                     # take the whole-model path
            import rankscope.train.models as models

            models.has_safetensors = lambda folder: False
        for d in deltas.from_model_pair(base, ft):
            norm2 += float(d.dense.norm()) ** 2
            n += 1
            del d
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024       # Linux: KiB
    return {"mode": mode, "peak": peak, "seconds": time.perf_counter() - start, "n": n,
            "norm": norm2 ** 0.5}


def _child(*args: str) -> dict:
    """This script run with ``args`` in a fresh interpreter; the JSON of its last line."""
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(mode: str, base: Path, ft: Path) -> dict:
    """``worker(mode)`` in a fresh interpreter."""
    return _child("--worker", mode, str(base), str(ft))


# -------------------------------------------------------------------------- output

def table(rows: dict[str, dict], size: int) -> str:
    """The peaks as GitHub markdown, with (peak − a) and (peak − a′) over size(one model)."""
    mib = 2**20
    base, code = rows["baseline"]["peak"], rows["code"]["peak"]
    lines = ["| path | modules | seconds | peak RSS MiB | − a, MiB | (− a) / one model | "
             "target | met | (− a′) / one model |", "|" + "---|" * 9]
    for mode, label in MODES.items():
        r = rows[mode]
        over = r["peak"] - base
        share = f"{100 * over / size:.1f}%" if mode != "baseline" else ""
        target = f"< {100 * TARGET:.0f}%" if mode == "streamed" else ""
        met = ("yes" if over / size < TARGET else "NO") if mode == "streamed" else ""
        beyond = f"{100 * (r['peak'] - code) / size:.1f}%" if mode in ("streamed", "whole") else ""
        n = r["n"] if mode != "baseline" else ""
        lines.append(f"| {label} | {n} | {r['seconds']:.1f} | {r['peak'] / mib:.0f} | "
                     f"{over / mib:.0f} | {share} | {target} | {met} | {beyond} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="registry name or model folder")
    parser.add_argument("--shard", default="100MB", help="max_shard_size of the saved pair")
    parser.add_argument("--layers", type=int, help="the model's architecture with this many "
                        "blocks (random weights) instead of the model itself")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--make-pair", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    if args.make_pair:
        print(json.dumps([str(p) for p in make_pair(args.model, args.make_pair, shard=args.shard,
                                                     layers=args.layers)]))
        return
    with tempfile.TemporaryDirectory(prefix="rankscope-stream-") as tmp:
        more = ["--layers", str(args.layers)] if args.layers else []
        base, ft = map(Path, _child("--make-pair", tmp, "--model", args.model, "--shard",
                                    args.shard, *more))
        size, n_files = checkpoint_bytes(base), len(list(base.glob("*.safetensors")))
        rows = {mode: measure(mode, base, ft) for mode in MODES}
    from rankscope.store.provenance import machine_heading     # imports torch: only now
    streamed, whole = rows["streamed"], rows["whole"]
    if streamed["n"] != whole["n"] or abs(streamed["norm"] - whole["norm"]) > 1e-6 * whole["norm"]:
        raise SystemExit(f"the two paths disagree: {streamed} vs {whole}")
    heading = machine_heading()
    model = f"{args.model}'s architecture with {args.layers} blocks" if args.layers else args.model
    about = (f"{model}, one model's checkpoint {size / 2**20:.0f} MiB in {n_files} "
             f"safetensors files (max_shard_size {args.shard}); both paths read "
             f"{streamed['n']} ΔW, ‖ΔW‖_F over all {streamed['norm']:.6g} in both")
    print(f"## benchmarks/stream.py — {heading}\n\n{about}\n\n{table(rows, size)}")
    if not args.no_write:
        from _results import write_section  # benchmarks/, beside this script

        command = " ".join(["python benchmarks/stream.py",
                            *(argv if argv is not None else sys.argv[1:])])
        key = f"stream.py --layers {args.layers}" if args.layers else "stream.py"
        write_section(RESULTS, key, (
            f"## benchmarks/stream.py — {heading}\n\n`{command}`: {about}. Each path in a "
            "fresh process; peak RSS is its `ru_maxrss` (memory-mapped pages included). "
            "a: the interpreter with torch, transformers and rankscope.analysis.deltas "
            "imported; a′: a, then `meta_backbone(base)` (transformers' modelling code imported, "
            "the modules built on the meta device; modules: the linear ones found); b: every ΔW of `from_model_pair(base, ft)` streamed from the "
            "safetensors shards (norm taken, dropped); c: the same loop with both models "
            "loaded whole (the fallback for folders without safetensors, forced).\n\n"
            f"{table(rows, size)}\n"))


if __name__ == "__main__":
    main()
