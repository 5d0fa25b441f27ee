"""Typed, frozen configurations: a sweep (the grid) and one run of it, with YAML in and out.

Precedence when building a sweep: defaults < the profile a YAML file names < the YAML file <
a ``--profile`` flag < the other command-line flags. A shipped task brings its own model and
LoRA targets (MiniLM's ``query``/``value`` for the classification tasks) unless they are given.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from rankscope.errors import InputError
from rankscope.store.runs import RunId

METHODS = ("full", "lora")
FULL_SCOPES = ("all", "linear", "targets")
STRATEGIES = ("ddp", "fsdp")        # how full fine-tuning spreads over torchrun's processes
# ‖ΔW*‖_F = 0.2·‖W₀‖_F: the smallest share whose planted signal stands above Adam's own drift,
# so that 400 CPU steps of full fine-tuning remove > 90% of the distillation loss (measured:
# rankscope.train.planted's docstring); near a real update's size (Hu et al. Table 7, r = 4:
# ‖ΔWq‖_F/‖Wq‖_F = 6.91/61.95 ≈ 0.11)
PLANTED_SCALE = 0.2
ALPHA_POLICIES = ("fixed", "scaled", "rslora")
# The published protocols a sweep can follow (docs/science.md, "Protocols"): the source, and
# the α policies it allows. Hu et al. hold α constant in r ("we simply set α to the first r we
# try and do not tune it") and tune one learning rate at one rank; Biderman et al. use α = 2r;
# Shuttleworth et al. α = 2r and rsLoRA. "alpha-study" compares the policies themselves.
PROTOCOLS = {
    "hu2021": ("Hu et al. 2021 §4.1: α constant in r, set to the first rank tried; one "
               "learning rate, tuned at one rank and held", ("fixed",)),
    "biderman2024": ("Biderman et al. 2024: α = 2r, learning rates searched per method",
                     ("scaled",)),
    "shuttleworth2024": ("Shuttleworth et al. 2024: α = 2r and rsLoRA", ("scaled", "rslora")),
    "alpha-study": ("rankscope's α study: fixed α, α = 2r and rsLoRA side by side",
                    ALPHA_POLICIES),
}
EQUIVALENCE_METRICS = ("auto", "loss", "accuracy")
SCHEDULES = ("cosine", "linear", "constant")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a sweep: model, data, schedule, and the grid of runs."""

    model: str = _f("smollm2-135m", "registry name, local folder or hub id")
    task: str | None = _f("news", "shipped task (news, qa, sentiment, topic, planted); None "
                                  "with --data")
    data: str | None = _f(None, "the user's own JSONL/CSV/text file instead of a shipped task")
    task_kind: str | None = _f(None, "lm, sft or cls: the schema of --data")
    planted_rank: int | dict = _f(4, "planted task: rank of ΔW* in every target, or a "
                                     "{module kind: rank} mapping ({query: 2, value: 8})")
    planted_scale: float = _f(PLANTED_SCALE, "planted task: ‖ΔW*‖_F as a share of ‖W₀‖_F, "
                                             "per module")
    planted_seed: int = _f(0, "planted task: seed of ΔW*'s directions (not a run seed: every "
                              "run of the sweep distils the same teacher)")
    methods: tuple[str, ...] = _f(("full", "lora"), "full and/or lora")
    full_scope: str = _f("all", "what full fine-tuning trains: all (every parameter), linear "
                                "(the backbone's linear weights and a new classification head) "
                                "or targets (the weights of the LoRA targets, and a new head)")
    ranks: tuple[int, ...] = _f((1, 2, 4, 8, 16, 64), "LoRA ranks")
    seeds: tuple[int, ...] = _f((0,), "seeds: LoRA init, data order, dropout")
    targets: tuple[str, ...] = _f(("q_proj", "v_proj"), "LoRA target modules, or all-linear")
    alpha_policy: str = _f("scaled", "fixed: α = alpha; scaled: α = alpha·r; rslora: α = alpha, s = α/√r")
    alpha: float = _f(2.0, "α (fixed, rslora) or the ratio c in α = c·r (scaled)")
    protocol: str | None = _f(None, "the published protocol the sweep follows (hu2021, "
                                    "biderman2024, shuttleworth2024, alpha-study); checked "
                                    "against alpha_policy")
    equivalence_metric: str = _f("auto", "what the equivalence test compares per held-out "
                                         "example: accuracy, loss, or auto (accuracy for "
                                         "classification, else loss)")
    equivalence_margin: float = _f(0.03, "the equivalence margin δ, fixed before the runs: in "
                                         "accuracy points (0.03 = 3 points), or for loss a share "
                                         "of full fine-tuning's gain in held-out loss over the "
                                         "base model (0.03 = 3% of the gain)")
    steps: int = _f(30, "optimizer steps per run")
    batch_size: int = _f(8, "sequences per micro-batch, over all processes")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_len: int = _f(128, "tokens per sequence")
    lr_full: float = _f(3e-5, "peak learning rate of full fine-tuning")
    lr_lora: float = _f(1e-3, "peak learning rate of LoRA")
    lr_search: bool = _f(False, "choose lr_full and lr_lora on a validation split of the "
                                "training examples before the sweep (rankscope.train.lr_search)")
    lr_grid_full: tuple[float, ...] = _f((1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
                                         "the peak rates the search tries for full fine-tuning")
    lr_grid_lora: tuple[float, ...] = _f((1e-4, 3e-4, 1e-3, 3e-3),
                                         "the peak rates the search tries for LoRA")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup: float = _f(0.1, "share of steps spent in linear warm-up")
    schedule: str = _f("cosine", "decay after warm-up: cosine, linear or constant")
    clip: float = _f(1.0, "gradient-norm clipping; 0 disables")
    split_seed: int = _f(0, "seed of the train/held-out split, shared by every run")
    eval_fraction: float = _f(0.1, "share of examples held out")
    max_train_examples: int | None = _f(None, "cap on training examples (blocks for lm)")
    max_eval_examples: int | None = _f(64, "cap on held-out examples (blocks for lm)")
    eval_every: int = _f(0, "evaluate every N steps (0: only before and after)")
    checkpoint_every: int = _f(10, "save a resumable checkpoint every N steps")
    snapshots: tuple[float, ...] = _f((), "shares of the steps (each in (0, 1)) at which a run "
                                      "also saves its update under snapshots/: the energy rank "
                                      "against training tokens (Biderman et al.)")
    bf16: bool | None = _f(None, "bf16 autocast (weights stay float32); default (null): on "
                                 "for CUDA and for CPUs with native bf16 (AMX, AVX-512 BF16)")
    device: str = _f("auto", "auto, cpu or cuda")
    strategy: str = _f("ddp", "full fine-tuning under torchrun: ddp (every process holds the whole "
                              "model and optimizer) or fsdp (parameters, gradients and AdamW "
                              "state sharded over the processes: torch's fully_shard)")
    profile: str | None = _f(None, "the profile these values started from (quick, paper)")

    def __post_init__(self):
        _check_types(self)
        _check_choice("methods", self.methods, METHODS)
        _check_choice("alpha_policy", (self.alpha_policy,), ALPHA_POLICIES)
        _check_choice("equivalence_metric", (self.equivalence_metric,), EQUIVALENCE_METRICS)
        if self.protocol is not None:
            _check_choice("protocol", (self.protocol,), tuple(PROTOCOLS))
            allowed = PROTOCOLS[self.protocol][1]
            if self.alpha_policy not in allowed:
                raise InputError(f"protocol: {self.protocol} trains with alpha_policy "
                                 f"{' or '.join(allowed)}, got {self.alpha_policy}")
        _check_choice("schedule", (self.schedule,), SCHEDULES)
        _check_choice("full_scope", (self.full_scope,), FULL_SCOPES)
        _check_choice("strategy", (self.strategy,), STRATEGIES)
        _check_planted(self)
        if not self.methods:
            raise InputError("methods: give at least one of full, lora")
        if "lora" in self.methods and (not self.ranks or any(r <= 0 for r in self.ranks)):
            raise InputError(f"ranks: every rank must be a positive integer, got {list(self.ranks)}")
        if not self.seeds:
            raise InputError("seeds: give at least one seed")
        if (self.task is None) == (self.data is None):
            raise InputError("task/data: give a shipped task or a --data file (one of them)")
        if self.data is not None and self.task_kind not in ("lm", "sft", "cls"):
            raise InputError("task_kind: --data needs --task-kind lm, sft or cls")
        for name in ("steps", "batch_size", "grad_accum", "max_len", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name}: must be positive, got {getattr(self, name)}")
        for name in ("lr_full", "lr_lora", "alpha", "equivalence_margin"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise InputError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1 or not 0 < self.eval_fraction < 1:
            raise InputError("warmup and eval_fraction: must lie in [0, 1) and (0, 1)")
        if not self.targets:
            raise InputError("targets: give module names or all-linear")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1
                   for v in self.snapshots):
            raise InputError(f"snapshots: expected shares of the steps in (0, 1), got "
                             f"{list(self.snapshots)}")

    def snapshot_steps(self) -> tuple[int, ...]:
        """The steps at which a run saves its update beside the last: each share of
        ``snapshots`` as a step (rounded, at least 1), below ``steps``, without repeats."""
        return tuple(sorted({max(1, round(s * self.steps)) for s in self.snapshots} - {self.steps}))

    def runs(self) -> list[RunId]:
        """The grid: a RunId (method, rank, seed) for every run, full first, in a fixed order."""
        grid = []
        for seed in self.seeds:
            if "full" in self.methods:
                grid.append(RunId("full", None, seed))
            if "lora" in self.methods:
                grid.extend(RunId("lora", r, seed) for r in sorted(self.ranks))
        return grid

    def lora_alpha(self, rank: int) -> float:
        """α for a LoRA run of rank r under the configured policy."""
        return self.alpha * rank if self.alpha_policy == "scaled" else self.alpha

    def training_view(self) -> dict:
        """The fields that change what a run computes (not the grid, not the profile label)."""
        skip = {"methods", "ranks", "seeds", "profile", "device", "protocol"}
        return {k: v for k, v in to_dict(self).items() if k not in skip}


_INTS = ("steps", "batch_size", "grad_accum", "max_len", "split_seed", "eval_every",
         "checkpoint_every", "max_train_examples", "max_eval_examples", "planted_seed")
_FLOATS = ("alpha", "lr_full", "lr_lora", "weight_decay", "warmup", "clip", "eval_fraction",
           "planted_scale", "equivalence_margin")
_STRS = ("model", "task", "data", "task_kind", "alpha_policy", "schedule", "device", "profile",
         "full_scope", "protocol", "equivalence_metric")
_NULLABLE = {"task", "data", "task_kind", "profile", "max_train_examples", "max_eval_examples",
             "protocol"}


def _check_types(cfg) -> None:
    """Each field holds its type (YAML says ``steps: ten`` as easily as ``steps: 10``).

    Raises:
        InputError: naming the field, the value and the type it needs.
    """
    def bad(name, value, what):
        raise InputError(f"{name}: expected {what}, got {value!r}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for name in _INTS:
        v = getattr(cfg, name)
        if (v is not None or name not in _NULLABLE) and not is_int(v):
            bad(name, v, "an integer")
    for name in _FLOATS:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            bad(name, v, "a number")
    for name in _STRS:
        v = getattr(cfg, name)
        if (v is not None or name not in _NULLABLE) and not isinstance(v, str):
            bad(name, v, "a string")
    if not isinstance(cfg.lr_search, bool):
        bad("lr_search", cfg.lr_search, "true or false")
    for f in fields(cfg):                       # the list fields (a YAML null is no list)
        if isinstance(f.default, tuple) and not isinstance(getattr(cfg, f.name), tuple):
            bad(f.name, getattr(cfg, f.name), "a list")
    for name in ("lr_grid_full", "lr_grid_lora"):
        grid = getattr(cfg, name)
        if not grid or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                               and math.isfinite(v) and v > 0 for v in grid):
            bad(name, list(grid), "a list of positive learning rates")
    for name in ("ranks", "seeds"):
        if not all(is_int(v) for v in getattr(cfg, name)):
            bad(name, list(getattr(cfg, name)), "a list of integers")
    for name in ("methods", "targets"):
        if not all(isinstance(v, str) for v in getattr(cfg, name)):
            bad(name, list(getattr(cfg, name)), "a list of names")
    if cfg.bf16 is not None and not isinstance(cfg.bf16, bool):
        bad("bf16", cfg.bf16, "true, false or null")


def _check_planted(cfg) -> None:
    """The planted task's rank (an int, or a mapping of module kinds to ints) and scale.

    A rank's upper bound, min(d_out, d_in) of each module it applies to, needs the model: the
    sweep checks it (``rankscope.train.planted.planted_ranks``) before anything is written.

    Raises:
        InputError: naming planted_rank (not a positive integer, an empty mapping) or
            planted_scale (not a finite positive number).
    """
    rank = cfg.planted_rank
    ranks = rank.values() if isinstance(rank, dict) else [rank]
    if isinstance(rank, dict) and not all(isinstance(k, str) for k in rank):
        raise InputError(f"planted_rank: module kinds must be names, got {list(rank)}")
    if not ranks or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0
                            for r in ranks):
        raise InputError(f"planted_rank: expected a positive integer or a mapping of module "
                         f"kinds to positive integers, got {rank!r}")
    if not (math.isfinite(cfg.planted_scale) and cfg.planted_scale > 0):
        raise InputError(f"planted_scale: must be a finite positive number, got "
                         f"{cfg.planted_scale}")


def _check_choice(name: str, values, allowed) -> None:
    bad = [v for v in values if v not in allowed]
    if bad:
        raise InputError(f"{name}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")


# Profiles size a sweep, whatever its task, and name the protocol its LoRA runs follow. quick
# answers the default job's question (the topic task on MiniLM, ``pipeline.job.DEFAULT_TASK``)
# on a 2-core CPU: three seeds (the equivalence test's interval resamples them), three ranks
# spanning 1–16, each method's rate searched on a validation split first, and enough steps that
# full fine-tuning plateaus (its questions are ~12 tokens: 32-token rows lose nothing). Full
# fine-tuning trains the backbone's linear weights and the head (the updates the question is
# about; MiniLM's 11.7M embedding weights made a step 1.5× slower). Steps: start at 300 and
# double until full fine-tuning's plateau gate passes (figures/README.md has the measurements).
# LoRA follows Hu et al. (protocol hu2021): α is held at the rank the learning rate is searched
# at (the sweep's middle rank, ``lr_search.search_rank``: 4 here, 8 for ranks 1–64), so the
# update's scale α/r is 1 there and shrinks as r grows. A third of the shipped task is held out
# (``eval_fraction``), so that the paired interval of a rank's difference from full
# fine-tuning is narrow enough to judge equivalence at the declared margin.
# cpu-paper is what ``make figures`` trains without a GPU (the figures' ``cpu`` variant), at
# most ~2 h on 2 cores: the quick budget (600 steps of 8 × 32 on MiniLM's topic task, rates
# searched) at the paper's ranks 1–64 with three seeds. If a cpu-paper run a figure uses fails
# a gate, the steps double once (1200) and that is reported, not tuned further. ``snapshots``
# keep ΔW at 10, 25 and 50% of training for the rank against tokens.
# paper is for a GPU (3 seeds, ranks 1–64, 1000 steps a run).
_HU = dict(protocol="hu2021", alpha_policy="fixed")
PROFILES = {
    "quick": dict(steps=600, batch_size=8, max_len=32, ranks=(1, 4, 16), seeds=(0, 1, 2),
                  full_scope="linear", **_HU, alpha=4.0, eval_fraction=0.3,
                  max_eval_examples=256, eval_every=50, checkpoint_every=200, lr_search=True,
                  lr_grid_full=(3e-5, 1e-4, 3e-4), lr_grid_lora=(3e-4, 1e-3, 3e-3)),
    "cpu-paper": dict(steps=600, batch_size=8, max_len=32, ranks=(1, 2, 4, 8, 16, 32, 64),
                      seeds=(0, 1, 2), full_scope="linear", **_HU, alpha=8.0,
                      eval_fraction=0.3, max_eval_examples=256, eval_every=150,
                      checkpoint_every=150, lr_search=True, lr_grid_full=(3e-5, 1e-4, 3e-4),
                      lr_grid_lora=(3e-4, 1e-3, 3e-3), snapshots=(0.1, 0.25, 0.5)),
    # 1000 steps × 8 × 128 = 1.0M tokens a run, ~15 passes over the 67k-token news split: lower
    # peak rates than quick's, so that held-out loss is not lost to over-fitting by the end.
    "paper": dict(steps=1000, batch_size=8, max_len=128, ranks=(1, 2, 4, 8, 16, 32, 64),
                  seeds=(0, 1, 2), **_HU, alpha=8.0, lr_full=1e-5, lr_lora=3e-4,
                  max_eval_examples=None, eval_every=100, checkpoint_every=250),
}


def to_dict(cfg) -> dict:
    """A config as plain YAML-safe values (tuples become lists)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _coerce(cls, values: dict) -> dict:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"unknown config field {unknown[0]!r}; known: {', '.join(known)}")
    out = {}
    for k, v in values.items():
        default = known[k].default
        if isinstance(default, tuple) and v is not None:
            v = tuple(v) if isinstance(v, (list, tuple)) else (v,)
        out[k] = v
    return out


def build_sweep(*, profile: str | None = None, yaml_path: str | Path | None = None,
                overrides: dict | None = None) -> SweepConfig:
    """Defaults, then a profile, then a YAML file, then explicit overrides.

    Raises:
        InputError: unknown profile, unreadable YAML, unknown fields or invalid values.
    """
    from_yaml = load_yaml(yaml_path) if yaml_path is not None else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}  # None: flag not given
    values: dict = dict(from_yaml)
    for key in ("profile", "task"):                     # names looked up before the checks
        for v in (values.get(key), flags.get(key)):
            if v is not None and not isinstance(v, str):
                raise InputError(f"{key}: expected a name, got {v!r}")
    base = values.get("profile") or profile            # sizes the YAML and flags refine
    for name in (base, flags.get("profile")):
        if name is not None and name not in PROFILES:
            raise InputError(f"profile: unknown {name!r}; choose from {', '.join(PROFILES)}")
    if base is not None:
        values = {**PROFILES[base], **values, "profile": base}
    if flags.get("profile") is not None:                # an explicit --profile resizes the YAML
        values.update(PROFILES[flags["profile"]])
    values.update(flags)
    # --data replaces the default (or profile's) task unless a task was named explicitly
    if values.get("data") is not None and "task" not in flags and "task" not in from_yaml:
        values["task"] = None
    _task_defaults(values)
    return SweepConfig(**_coerce(SweepConfig, values))


def _task_defaults(values: dict) -> None:
    """A shipped task's own model, that model's query/value names (also for a slice of it,
    ``minilm-l6@2l``) and the task's own settings (the planted task's ``lr_full``), unless
    given."""
    from rankscope.train.corpora import TASKS

    spec = TASKS.get(values.get("task", SweepConfig.task))
    if spec is None:
        return
    values.setdefault("model", spec.default_model)
    for name, value in spec.defaults:
        values.setdefault(name, value)
    model = str(values["model"])
    if model == spec.default_model or model.startswith(spec.default_model + "@"):  # or a slice
        values.setdefault("targets", spec.default_targets)


def read_sweep_config(runs: str | Path, *, needed_by: str) -> SweepConfig:
    """The SweepConfig a sweep trained with: its ``sweep.yaml`` (``runs`` is the sweep folder
    or a run folder inside it).

    Raises:
        InputError: no sweep.yaml there (``needed_by`` names what needs it), or an invalid one.
    """
    from rankscope.store.runs import SWEEP_FILE, sweep_root

    root = sweep_root(runs)
    if not (root / SWEEP_FILE).is_file():
        raise InputError(f"{root} has no {SWEEP_FILE}: {needed_by} needs the sweep's settings "
                         "to rebuild its held-out split")
    return build_sweep(yaml_path=root / SWEEP_FILE)


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file.

    Raises:
        InputError: a missing file, invalid YAML, or a document that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"missing config file {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML in {path}: {str(e).splitlines()[0]}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise InputError(f"config {path} must be a mapping of field: value")
    return doc


def changed_fields(old: dict, new: dict) -> list[str]:
    """The fields in which a recorded config ``old`` (``sweep.yaml``, a run's ``config.yaml``)
    differs from ``new``, sorted. SweepConfig fields that ``new`` has and ``old`` lacks read as
    their defaults: a field added to rankscope since the folder was written (``full_scope``,
    ``planted_*``) reads as the value the folder was trained with, so the folder still resumes."""
    defaults = to_dict(SweepConfig())
    old = {**{k: defaults[k] for k in new if k in defaults}, **old}
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def dump_yaml(cfg) -> str:
    """A config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg, **changes):
    """A copy of a frozen config with some fields changed (validated again)."""
    return dataclasses.replace(cfg, **changes)
