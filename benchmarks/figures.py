"""`make figures` end to end: wall time, each stage's share, and tokens/s per run kind.

Run: python benchmarks/figures.py              # every experiment of experiments/paper, the cpu
                                               # variant (gpu where CUDA is present), into a new
                                               # temporary runs folder: ~2 h on 2 cores
     python benchmarks/figures.py experiments/paper/mlp_targets.yaml --runs-root runs
                                               # one experiment; runs finished earlier are
                                               # skipped, and their time is not in the table

Stage times come from the pipeline's own printed lines, each stamped as it arrives: a line
starts a segment that ends at the next line (``sweep …``, ``lr search: …`` and each run's
summary are the sweep; ``draw …`` the figure's; compare and truncate print their line when
their work is done, so the segment ending at such a line is theirs). The sweep's
share is split into its runs (the sum of the manifests' ``wall_time_s`` of the runs trained in
this invocation) and the rest (loading, base evaluation, the learning-rate searches). tokens/s
per run kind is the median over the runs of that kind (method, rank, adapted modules). The
machine is named with whether the runs trained under bf16 autocast.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _timing import bf16_word, kind_rows, run_kinds, stage_rows
from rankscope.pipeline.stages import UP_TO_DATE

STAGES = ("sweep", "compare", "truncate", "draw", "other")


def trained_here(line: str) -> bool:
    """A run's summary line for a run trained in this invocation (a resumed one says so)."""
    return " → " in line and " tok/s" in line


def stage_of(line: str) -> str:
    """The stage a printed line names (``other`` for none)."""
    head = line.split(" ", 1)[0]
    if head in ("compare", "truncate", "draw"):
        return head
    if head in ("sweep", "lr") or trained_here(line) or " → " in line and "resumed" in line \
            or line.rstrip().endswith("finished earlier, skipped"):
        return "sweep"
    return "other"


def segments(stamped: list[tuple[float, str]], t0: float, end: float) -> dict[str, float]:
    """Seconds per stage. Each line's segment runs to the next line (the last one to ``end``)
    and is its stage's, except that compare and truncate print their line when their work is
    done: the segment that ends at such a line (not an "up to date" one) is theirs."""
    out = dict.fromkeys(STAGES, 0.0)
    out["other"] += (stamped[0][0] if stamped else end) - t0      # before the first line
    nexts = stamped[1:] + [(end, "")]
    for (t, line), (nxt, after) in zip(stamped, nexts):
        done = stage_of(after) in ("compare", "truncate") and not after.endswith(UP_TO_DATE)
        out[stage_of(after) if done else stage_of(line)] += nxt - t
    return out


def trained_runs(stamped: list[tuple[float, str]]) -> list[dict]:
    """The manifests of the runs trained in this invocation (their summary lines were printed)."""
    found, folder = [], None
    for _, line in stamped:
        if line.startswith("sweep ") and ": " in line:
            folder = Path(line[len("sweep "):].rsplit(": ", 1)[0])
        elif folder is not None and trained_here(line):
            manifest = folder / line.split()[0] / "manifest.json"
            if manifest.is_file():
                found.append(json.loads(manifest.read_text()))
    return found


def table(stamped, t0: float, end: float, per_experiment: list[tuple[str, float, int]], *,
          command: str, variant: str) -> str:
    from rankscope.store.provenance import machine_heading

    total = end - t0
    stages = segments(stamped, t0, end)
    manifests = trained_runs(stamped)
    kinds = run_kinds(manifests, targets=True)
    skipped = sum(line.rstrip().endswith("finished earlier, skipped") for _, line in stamped)
    out = [f"## benchmarks/figures.py — {machine_heading()}", "",
           f"`{command}`: the {variant} variant of {len(per_experiment)} experiment(s); "
           f"{len(manifests)} runs trained here, {skipped} finished earlier and skipped; runs "
           f"under bf16 autocast: {bf16_word(kinds)}.",
           "", f"**End to end: {total:.0f} s ({total / 60:.1f} min).**", ""]
    out += stage_rows(list(stages.items()), kinds, total,
                      "loading, base evaluation, learning-rate searches")
    out += ["", "| experiment | seconds | runs trained |", "|---|---|---|"]
    out += [f"| {name} | {sec:.0f} | {n} |" for name, sec, n in per_experiment]
    out += [""] + kind_rows(kinds)
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", nargs="?", default="experiments/paper",
                   help="an experiment YAML, or a folder of them (default: experiments/paper)")
    p.add_argument("--variant", default="auto", choices=("auto", "quick", "cpu", "gpu"))
    p.add_argument("--runs-root", type=Path, help="sweeps folder (default: a new temporary one)")
    p.add_argument("--out", type=Path, help="figures folder (default: a new temporary one)")
    p.add_argument("--write", action="store_true", help="replace this script's RESULTS.md section")
    args = p.parse_args()

    from rankscope.outputs.experiments import default_variant, experiment_files, load_experiment
    from rankscope.pipeline.figures import run_experiment

    files = experiment_files(args.experiment, all_=Path(args.experiment).is_dir())
    for f in files:
        load_experiment(f)
    variant = default_variant() if args.variant == "auto" else args.variant
    stamped: list[tuple[float, str]] = []

    def log(line: str) -> None:
        stamped.append((time.perf_counter(), line))
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    per_experiment = []
    with tempfile.TemporaryDirectory() as tmp:
        runs_root = args.runs_root or Path(tmp) / "runs"
        out = args.out or Path(tmp) / "figures"
        t0 = time.perf_counter()
        for f in files:
            start, first = time.perf_counter(), len(stamped)
            run_experiment(f, variant=variant, out=out, runs_root=runs_root, log=log,
                           progress=False)
            per_experiment.append((Path(f).stem, time.perf_counter() - start,
                                   sum(trained_here(line) for _, line in stamped[first:])))
        end = time.perf_counter()
        command = "python benchmarks/figures.py" + (
            f" {args.experiment}" if args.experiment != "experiments/paper" else "") + (
            f" --runs-root {args.runs_root}" if args.runs_root else "")
        body = table(stamped, t0, end, per_experiment, command=command, variant=variant)
    print(body)
    if args.write:
        from _results import write_section

        write_section(Path(__file__).with_name("RESULTS.md"), "figures.py", body)


if __name__ == "__main__":
    main()
