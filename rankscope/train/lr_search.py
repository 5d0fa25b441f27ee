"""The learning-rate search: each method's peak rate chosen on a validation split, before the sweep.

Hu et al. and Biderman et al. tune the learning rate per method; a comparison at one arbitrary
rate per method compares the rates as much as the methods (measured: on the planted task, full
fine-tuning at 3e-4 stops at 2.6× the held-out loss of LoRA r = 4 at 1e-3, whatever the set of
weights it trains: ``rankscope.train.planted``). The rule, fixed before any sweep is read:

* **validation split** — a seeded share (``eval_fraction``, at least 8, at most
  ``max_eval_examples``) of the *training* examples; the held-out split the sweep reports is
  never seen. The candidates train on the rest; the sweep's runs then train on the whole
  training split at the chosen rates.
* **candidates** — every rate of ``lr_grid_full`` for full fine-tuning, of ``lr_grid_lora``
  for LoRA at the sweep's middle rank (``search_rank``), each for the sweep's own steps,
  schedule, batches and first seed. Under fixed α (Hu et al.'s protocol) that one rate is
  held at every rank. Where α grows with r (α = 2r, rsLoRA) a larger rank takes a larger step
  at the same rate, so LoRA's rate is searched at the smallest and largest ranks too
  (``search_ranks``), and each LoRA run trains at the rate of the searched rank nearest its
  own (in log r; ``rate_for``).
* **choice** — the lowest validation loss (the highest accuracy for classification); a
  candidate whose loss is not finite is out.
* **beyond the grid** — a choice at either end of the rates tried so far is followed by one
  more candidate past that end, one grid step further (the ratio of the grid's two outermost
  rates at that end), up to ``EXTEND_MAX`` times per method; a choice still at an end after
  that is flagged: the best rate may lie beyond it.

The grid, every candidate's validation metric and the choice are written to
``<sweep>/lr_search.json`` (one candidate at a time, so a cut search resumes); the sweep's
runs record the chosen rates in their ``config.yaml``.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Callable

import torch

from rankscope.errors import InputError
from rankscope.store.atomic import atomic_write_json
from rankscope.store.runs import LR_SEARCH_FILE, RunId
from rankscope.train.config import replace
from rankscope.train.data import TaskData
from rankscope.train.evaluation import evaluate
from rankscope.train.loop import train_in_process
from rankscope.train.model_setup import build_model


EXTEND_MAX = 2          # candidates tried past an end of a method's grid, at most


def search_rank(ranks: tuple[int, ...]) -> int:
    """The LoRA rank the search trains: the middle of the sweep's ranks (the upper middle of
    an even count)."""
    r = sorted(ranks)
    return r[len(r) // 2]


def search_ranks(ranks: tuple[int, ...], alpha_policy: str) -> tuple[int, ...]:
    """The LoRA ranks the search trains: the middle one under fixed α, else the smallest, the
    middle and the largest."""
    mid = search_rank(ranks)
    return (mid,) if alpha_policy == "fixed" else tuple(sorted({min(ranks), mid, max(ranks)}))


def rate_for(rank: int, rates: dict[int, float]) -> float:
    """The rate of the searched rank nearest ``rank`` in log r (the smaller on a tie)."""
    return rates[min(rates, key=lambda r: (abs(math.log2(r) - math.log2(rank)), r))]


def validation_split(task: TaskData, *, fraction: float, seed: int,
                     cap: int | None = None) -> TaskData:
    """``task`` with its training split divided: a seeded share as ``eval``, the rest as ``train``.

    Raises:
        InputError: too few training examples to leave 8 on each side.
    """
    n = task.train["input_ids"].shape[0]
    n_val = max(8, round(n * fraction))
    n_val = min(n_val, cap) if cap else n_val
    if n - n_val < 8:
        raise InputError(f"the learning-rate search needs at least 16 training examples, "
                         f"the split has {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

    def take(side, idx):
        picked = {k: v[idx] for k, v in side.items()}
        return type(side)(picked, side.teacher) if hasattr(side, "teacher") else picked

    return dc_replace(task, train=take(task.train, order[n_val:]),
                      eval=take(task.train, order[:n_val]), n_train_examples=n - n_val,
                      n_eval_examples=n_val)


def _score(result: dict) -> float:
    """Lower is better: the loss, or minus the accuracy for classification."""
    return -result["accuracy"] if "accuracy" in result else result["loss"]


def beyond(grid: tuple[float, ...], tried: list[float], lr: float) -> float | None:
    """The next rate to try past the end of ``tried`` where ``lr`` sits, one grid step further;
    None when ``lr`` is inside, the grid has one rate, or ``EXTEND_MAX`` rates were added."""
    g = sorted(grid)
    if len(g) < 2 or len(set(tried)) - len(set(g)) >= EXTEND_MAX:
        return None
    if lr == max(tried):
        return max(tried) * g[-1] / g[-2]
    if lr == min(tried):
        return min(tried) * g[0] / g[1]
    return None


def choose(rows: list[dict], grid: tuple[float, ...]) -> dict:
    """The best finite candidate of one method, and whether it sits at an end of the rates
    in ``grid`` (the rates tried)."""
    ok = [r for r in rows if math.isfinite(r["score"])]
    if not ok:
        raise InputError(f"the learning-rate search for {rows[0]['method']}: every candidate "
                         f"diverged ({', '.join(str(r['lr']) for r in rows)})")
    best = min(ok, key=lambda r: (r["score"], r["lr"]))
    return {"lr": best["lr"], "at_edge": best["lr"] in (min(grid), max(grid)),
            "validation": best["validation"]}


def search(cfg, task: TaskData, out: Path, *, device: torch.device, bf16: bool,
           main: bool = True, log: Callable[[str], None] = print):
    """Run (or resume) the search into ``out/lr_search.json``; the config at the chosen rates.

    Returns:
        (``cfg`` with ``lr_full`` and ``lr_lora`` replaced by the choices of the methods it
        runs (LoRA's at the middle rank), {searched LoRA rank: its chosen rate}).
    Raises:
        InputError: too few training examples, or a method whose every candidate diverged.
    """
    path = out / LR_SEARCH_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    rows = record.get("candidates", [])
    val = validation_split(task, fraction=cfg.eval_fraction, seed=cfg.split_seed + 1,
                           cap=cfg.max_eval_examples)
    seed, mid = cfg.seeds[0], search_rank(cfg.ranks)
    grids = {"full": cfg.lr_grid_full, "lora": cfg.lr_grid_lora}
    cells = [("full", None)] if "full" in cfg.methods else []
    if "lora" in cfg.methods:
        cells += [("lora", r) for r in search_ranks(cfg.ranks, cfg.alpha_policy)]
    choices, rates = {}, {}
    for method, rank in cells:
        todo = list(grids[method])
        while todo:                       # the grid, then one rate past its end at a time
            for lr in todo:
                if not any(_cell(r, method, rank) and r["lr"] == lr for r in rows):
                    _try(cfg, val, rows, method=method, lr=lr, seed=seed, rank=rank or mid,
                         label=_name(method, rank, mid), device=device, bf16=bf16, log=log)
                    if main:
                        _write(path, cfg, rows, choices, n_val=val.n_eval_examples, seed=seed)
            mine = [r for r in rows if _cell(r, method, rank)]
            tried = [r["lr"] for r in mine]
            best = choose(mine, tuple(tried))
            nxt = beyond(grids[method], tried, best["lr"])
            todo = [] if nxt is None else [nxt]
            if todo:
                log(f"lr search: {_name(method, rank, mid)} best at the end of its rates, trying {nxt:g}")
        choices[_name(method, rank, mid)] = best
        if method == "lora":
            rates[rank] = best["lr"]
    if main:
        _write(path, cfg, rows, choices, n_val=val.n_eval_examples, seed=seed)
    for name, ch in choices.items():
        edge = " (at the edge of the rates tried)" if ch["at_edge"] else ""
        log(f"lr search: {name} chooses {ch['lr']:g}{edge}")
    chosen = {"lr_full": choices["full"]["lr"]} if "full" in choices else {}
    if rates:
        chosen["lr_lora"] = rates[mid]
    return replace(cfg, **chosen), rates


def _cell(row: dict, method: str, rank: int | None) -> bool:
    """Whether a candidate row belongs to ``method`` (and, for LoRA, the searched ``rank``)."""
    return row["method"] == method and (rank is None or row.get("rank") == rank)


def _name(method: str, rank: int | None, mid: int) -> str:
    """The candidate's label: the method, and a LoRA rank other than the middle one."""
    return method if rank in (None, mid) else f"{method} r = {rank}"


def _try(cfg, val: TaskData, rows: list[dict], *, method: str, lr: float, seed: int, rank: int,
         label: str, device: torch.device, bf16: bool, log: Callable[[str], None]) -> None:
    """Train one candidate on the validation split's training side and append its row."""
    c = replace(cfg, **{f"lr_{method}": lr})
    run = RunId(method, rank if method == "lora" else None, seed)
    model = build_model(c, val, run).to(device)
    losses = train_in_process(model, val, cfg=c, method=method, seed=seed, device=device,
                              bf16=bf16, desc=f"lr {method} {lr:g}")
    result = evaluate(model, val.eval, kind=val.kind, device=device, bf16=bf16)
    score = _score(result) if math.isfinite(losses[-1]) else math.inf
    rows.append({"method": method, "rank": run.rank, "lr": lr, "validation": result,
                 "last_train_loss": losses[-1], "score": score})
    log(f"lr search: {label:<4} lr {lr:<8g} validation {_fmt(result)}")


def _fmt(result: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in result.items())


def _write(path: Path, cfg, rows, choices, *, n_val: int, seed: int) -> None:
    atomic_write_json(path, {
        "rule": "lowest validation loss (highest accuracy for classification) on a seeded share "
                "of the training split; the sweep's steps, schedule and first seed",
        "validation_examples": n_val, "seed": seed,
        "lora_ranks": list(search_ranks(cfg.ranks, cfg.alpha_policy)),
        "grid": {"full": list(cfg.lr_grid_full), "lora": list(cfg.lr_grid_lora)},
        "extend_max": EXTEND_MAX,
        "candidates": rows, "chosen": choices})
