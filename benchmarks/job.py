"""The default job end to end: wall time, each stage's share of it, and tokens/s per run kind.

Run: python benchmarks/job.py                       # `rankscope run` (quick on a CPU) into a
                                                    # temporary folder, then the table
     python benchmarks/job.py --study rankscope-study --log make_run.log
                                                    # the table of a job already run, from its
                                                    # printed stage lines and its runs' manifests

Stage times come from the job's own stage lines (``[i/5] name: … (Ns)`` and ``done in Ns``):
a stage's seconds are the gap to the next line. tokens/s per run kind is the median over seeds
of each run's ``tokens_per_s`` (attended tokens; the learning-rate search's candidates are not
runs and have none). The machine is named with whether the runs trained under bf16 autocast.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from _timing import bf16_word, kind_rows, run_kinds, stage_rows

STAGE = re.compile(r"^\[(\d+)/\d+\] (\w+):.*\((\d+)s\)\s*$")
DONE = re.compile(r"^done in (\d+)s")


def stage_times(lines: list[str]) -> tuple[list[tuple[str, float]], float]:
    """[(stage, seconds)] in order, and the total, from the job's printed lines."""
    marks = [(m.group(2), float(m.group(3))) for m in map(STAGE.match, lines) if m]
    done = [float(m.group(1)) for m in map(DONE.match, lines) if m]
    if not marks or not done:
        sys.exit("benchmarks/job.py: no stage lines and 'done in' line in the job's output")
    ends = [t for _, t in marks[1:]] + done[:1]
    return [(name, end - start) for (name, start), end in zip(marks, ends)], done[0]


def table(lines: list[str], study: Path, *, command: str, source: str) -> str:
    from rankscope.store.provenance import machine_heading

    stages, total = stage_times(lines)
    kinds = run_kinds([json.loads(p.read_text())
                       for p in sorted((study / "runs").glob("*/manifest.json"))])
    cfg = (study / "runs" / "sweep.yaml").read_text() if (study / "runs" / "sweep.yaml").is_file() \
        else ""
    steps = re.search(r"^steps: (\d+)", cfg, re.M)
    out = [f"## benchmarks/job.py — {machine_heading()}", "",
           f"`{command}` ({source}); runs trained under bf16 autocast: {bf16_word(kinds)}; "
           f"{steps.group(1) if steps else '?'} steps a run.", "",
           f"**End to end: {total:.0f} s ({total / 60:.1f} min).**", ""]
    out += stage_rows(stages, kinds, total, "learning-rate search, base evaluation, loading")
    out += [""] + kind_rows(kinds)
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", type=Path, help="a finished job's folder (with --log)")
    p.add_argument("--log", type=Path, help="that job's printed output")
    p.add_argument("--what", default="a job run before, read back",
                   help="with --study: what that job was (for the table's heading)")
    p.add_argument("--write", action="store_true", help="replace this script's RESULTS.md section")
    args = p.parse_args()
    if (args.study is None) != (args.log is None):
        sys.exit("benchmarks/job.py: give both --study and --log, or neither")
    if args.study is not None:
        lines = args.log.read_text().splitlines()
        body = table(lines, args.study, command=f"python benchmarks/job.py --study {args.study} "
                     f"--log {args.log.name}", source=args.what)
    else:
        from rankscope.pipeline.job import job_config, run_job

        lines: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_job(job_config(), Path(tmp) / "study", progress=False,
                    log=lambda line: (lines.append(line), print(line, flush=True)))
            print(f"wall {time.perf_counter() - t0:.0f}s")
            body = table(lines, Path(tmp) / "study", command="python benchmarks/job.py",
                         source="the default job, run here")
    print(body)
    if args.write:
        from _results import write_section

        write_section(Path(__file__).with_name("RESULTS.md"), "job.py", body)


if __name__ == "__main__":
    main()
