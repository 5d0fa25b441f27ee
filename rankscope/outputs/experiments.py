"""Experiment YAMLs (the paper figures): read and resolved into sweeps, captioned, drawn, written.

An experiment file (``experiments/paper/*.yaml``) holds:

    result:    the published result it reproduces in shape (the start of every caption)
    figure:    the builder of ``figure_data.BUILDERS`` that turns results tables into the figure
    sweep:     a SweepConfig YAML (path relative to the experiment file), or
    sweeps:    {label: path, or {file: path, <SweepConfig field>: value, …}} for several
    settings:  keyword options of the builder
    truncate:  {ks: [...], lora_min_rank: r} when the figure needs the truncation test
    in_shape:  the published shape as numbered checks on the figure data (``in_shape``)
    variants:  {quick|cpu|gpu: {sweep: {field: value}, sweeps: {label: {field: value}},
                                settings: {...}, truncate: {...}}}

A sweep's config is, last winning: its file, its own overrides in ``sweeps``, the variant's
``sweep`` (for every sweep of the experiment), the variant's ``sweeps``. ``pipeline.figures``
trains and analyses the sweeps; the figure is written atomically here as ``<out>/<name>.csv``
(its data: column ``plot`` names the plot function, ``panel`` the panel, the rest are the
inputs: ``rankscope plot`` re-draws it from the CSV alone), ``<name>.png`` and ``<name>.json``
(the caption and provenance, which ``rankscope plot`` adds when present).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rankscope.train.config import SweepConfig, build_sweep, load_yaml, replace
from rankscope.errors import InputError
from rankscope.store.atomic import atomic_file, atomic_write_json, atomic_write_text
from rankscope.outputs.plots import DPI, draw_figure
from rankscope.outputs.figure_data import BUILDERS
from rankscope.outputs.in_shape import check_criteria

KEYS = ("result", "figure", "sweep", "sweeps", "settings", "truncate", "in_shape", "variants")
VARIANTS = ("quick", "cpu", "gpu")
VARIANT_KEYS = ("sweep", "sweeps", "settings", "truncate")
TRUNCATE_KEYS = ("ks", "lora_min_rank")


@dataclass(frozen=True)
class Experiment:
    """One paper figure: what it reproduces, its sweeps and the settings of its figure."""

    name: str
    path: Path
    result: str
    figure: str
    sweeps: dict                  # label → (SweepConfig YAML path, {field: value} overrides)
    settings: dict
    truncate: dict | None
    variants: dict
    in_shape: tuple = ()          # the checks of ``in_shape.check_criteria``


def _mapping(value, where: str, allowed=None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{where}: must be a mapping")
    bad = sorted(set(value) - set(allowed)) if allowed is not None else []
    if bad:
        raise InputError(f"{where}: unknown key {bad[0]!r}; known: {', '.join(allowed)}")
    return value


def _sweep_entry(value, base: Path, where: str) -> tuple[Path, dict]:
    if isinstance(value, str):
        return base / value, {}
    entry = dict(_mapping(value, where))
    if "file" not in entry:
        raise InputError(f"{where}: give a SweepConfig file, or a mapping with a 'file' key")
    return base / entry.pop("file"), entry


def load_experiment(path: str | Path) -> Experiment:
    """An experiment YAML, validated (its sweeps, variants and settings are checked too).

    Raises:
        InputError: a missing file, an unknown key, figure or variant, a setting the figure
            does not take, or a sweep that does not resolve to a valid SweepConfig.
    """
    path = Path(path)
    doc = _mapping(load_yaml(path), f"experiment {path}", KEYS)
    where = f"experiment {path.name}"
    for key in ("result", "figure", "variants"):
        if key not in doc:
            raise InputError(f"{where}: missing key {key!r}")
    if doc["figure"] not in BUILDERS:
        raise InputError(f"{where}: unknown figure {doc['figure']!r}; known: {', '.join(BUILDERS)}")
    if ("sweep" in doc) == ("sweeps" in doc):
        raise InputError(f"{where}: give one of 'sweep' (a file) or 'sweeps' (label: file)")
    raw = {None: doc["sweep"]} if "sweep" in doc else _mapping(doc["sweeps"], f"{where}: sweeps")
    sweeps = {k: _sweep_entry(v, path.parent, f"{where}: sweep {k or ''}".strip())
              for k, v in raw.items()}
    variants = _mapping(doc["variants"], f"{where}: variants", VARIANTS)
    takes = set(inspect.signature(BUILDERS[doc["figure"]]).parameters) - {"results"}
    _mapping(doc.get("settings"), f"{where}: settings", sorted(takes))
    _mapping(doc.get("truncate"), f"{where}: truncate", TRUNCATE_KEYS)
    for v, spec in variants.items():
        spec = _mapping(spec, f"{where}: variant {v}", VARIANT_KEYS)
        _mapping(spec.get("sweeps"), f"{where}: variant {v}: sweeps", [k for k in raw if k])
        _mapping(spec.get("settings"), f"{where}: variant {v}: settings", sorted(takes))
        _mapping(spec.get("truncate"), f"{where}: variant {v}: truncate", TRUNCATE_KEYS)
    exp = Experiment(name=path.stem, path=path, result=str(doc["result"]), figure=doc["figure"],
                     sweeps=sweeps, settings=dict(doc.get("settings") or {}),
                     truncate=doc.get("truncate"), variants=variants,
                     in_shape=tuple(check_criteria(doc.get("in_shape"), where)))
    for v in variants:
        resolve(exp, v)
    return exp


def resolve(exp: Experiment, variant: str) -> tuple[dict[str, SweepConfig], dict, dict | None]:
    """The variant's sweeps (label → SweepConfig), builder settings and truncation options.

    Raises:
        InputError: the experiment has no such variant, or a sweep is invalid.
    """
    if variant not in exp.variants:
        raise InputError(f"experiment {exp.name} has no variant {variant!r} "
                         f"(it has {', '.join(exp.variants) or 'none'})")
    spec = exp.variants[variant] or {}
    over, per = dict(spec.get("sweep") or {}), spec.get("sweeps") or {}
    cfgs = {}
    for label, (file, own) in exp.sweeps.items():
        values = {**own, **over, **(per.get(label) or {})}
        cfg = build_sweep(yaml_path=file, overrides=values)
        nones = {k: None for k, v in values.items() if v is None}   # an explicit null wins
        cfgs[label or _targets_label(cfg)] = replace(cfg, **nones) if nones else cfg
    trunc = exp.truncate
    if trunc is not None or spec.get("truncate"):
        trunc = {**(trunc or {}), **(spec.get("truncate") or {})}
    return cfgs, {**exp.settings, **(spec.get("settings") or {})}, trunc


def _targets_label(cfg: SweepConfig) -> str:
    return "LoRA on {" + ", ".join(cfg.targets) + "}"


def _alpha_text(c: SweepConfig) -> str:
    """How the sweep scales LoRA's update: α fixed, α = c·r, or rsLoRA's α/√r."""
    return {"fixed": f"α = {c.alpha:g}", "scaled": f"α = {c.alpha:g}r",
            "rslora": f"rsLoRA, α = {c.alpha:.3g}"}[c.alpha_policy]


def caption(exp: Experiment, variant: str, cfgs: dict[str, SweepConfig]) -> str:
    """The result reproduced, then the profile, model, task and training of each sweep."""
    first = next(iter(cfgs.values()))

    def training(c: SweepConfig) -> str:
        return f"{c.steps} steps of {c.batch_size}×{c.max_len} tokens"

    parts = []
    for c in cfgs.values():
        runs = ["full fine-tuning"] if "full" in c.methods else []
        if "lora" in c.methods:
            runs.append(f"LoRA on {{{', '.join(c.targets)}}} at r ∈ {{{', '.join(map(str, c.ranks))}}}"
                        f" ({_alpha_text(c)}, protocol {c.protocol or 'not named'})")
        own = f", {training(c)}" if training(c) != training(first) else ""   # a sweep trained longer
        parts.append(f"{' + '.join(runs)}, seeds {list(c.seeds)}{own}")
    return (f"{exp.result}. {variant} profile: {first.model}, task {first.task or first.data}, "
            f"{training(first)}; {'; '.join(parts)}.")


def write_figure(df: pd.DataFrame, out: Path, name: str, *, meta: dict) -> Path:
    """``out/<name>.csv``, ``.json`` and ``.png``, each written atomically. Returns the PNG."""
    import matplotlib.pyplot as plt

    fig = draw_figure(df, caption=meta.get("caption"))     # fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    atomic_write_json(out / f"{name}.json", meta)
    png = out / f"{name}.png"
    save_png(fig, png)
    plt.close("all")
    return png


def save_png(fig, png: Path) -> None:
    """Save a Figure as PNG, atomically."""
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")


def redraw(csv: str | Path, png: str | Path | None = None) -> Path:
    """Re-draw a figure from its CSV (and the caption of ``<csv>.json`` beside it, if any).

    Raises:
        InputError: a missing, empty or unreadable CSV; one that is not figure data (no
            ``plot``/``panel`` columns, an unknown plot, a data column missing) or whose
            values cannot be drawn; an unreadable caption file; a PNG path that is a
            folder or lies in no folder.
    """
    import matplotlib.pyplot as plt

    csv = Path(csv)
    if not csv.is_file():
        raise InputError(f"missing figure data {csv}")
    try:
        df = pd.read_csv(csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt figure data {csv}: {e}") from None
    side = csv.with_suffix(".json")
    try:
        meta = json.loads(side.read_text()) if side.is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt figure caption file {side}: {e}") from None
    if not isinstance(meta, dict):
        raise InputError(f"figure caption file {side} is not a JSON object")
    png = Path(png) if png is not None else csv.with_suffix(".png")
    if png.is_dir() or not png.absolute().parent.is_dir():
        raise InputError(f"cannot write {png}: " + ("it is a folder" if png.is_dir() else
                                                     f"no folder {png.absolute().parent}"))
    try:
        fig = draw_figure(df, caption=meta.get("caption"))
    except InputError:
        raise
    except (TypeError, KeyError, ValueError) as e:     # values of the wrong kind in a column
        plt.close("all")
        raise InputError(f"cannot draw figure data {csv}: {e}") from None
    save_png(fig, png)
    plt.close("all")
    return png


def default_variant() -> str:
    """``gpu`` where CUDA is available, else ``cpu``."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def experiment_files(target: str | Path, *, all_: bool) -> list[Path]:
    """The experiment YAMLs named by ``target``: a file, or with ``all_`` every YAML in a folder."""
    target = Path(target)
    if target.is_dir():
        if not all_:
            raise InputError(f"{target} is a folder: pass --all to run every experiment in it")
        files = sorted(target.glob("*.yaml"))
        if not files:
            raise InputError(f"no experiment YAML in {target}")
        return files
    if not target.is_file():
        raise InputError(f"missing experiment file {target}")
    return [target]

