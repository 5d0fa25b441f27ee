"""Provenance for every artifact: package versions, git revision, time, machine."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGES = ("rankscope", "torch", "transformers", "peft", "safetensors", "numpy", "pandas")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """The git revision of the rankscope checkout, with ``-dirty`` when it has changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


def now() -> str:
    """The current UTC time, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, str | int]:
    """The host: processor (its model name where /proc/cpuinfo gives one), platform and
    logical CPU count."""
    import os

    return {"platform": platform.platform(),
            "processor": _cpu_model() or platform.processor() or platform.machine(),
            "cpus": os.cpu_count() or 0}


def _cpu_model() -> str | None:
    """The first "model name" of /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return " ".join(line.split(":", 1)[1].split()) or None
    except OSError:
        return None
    return None


def machine_heading() -> str:
    """One line naming the machine, the software, the date and the load, for benchmark tables.

    The load average is the machine's 1-minute one when called: other jobs slow a benchmark.
    """
    import os

    import torch

    m = machine()
    cuda = f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{m['processor']}, {m['platform']}, {m['cpus']} cores "
            f"({torch.get_num_threads()} torch threads){cuda}, torch {torch.__version__}, "
            f"{_dt.date.today().isoformat()}{load}")


def provenance() -> dict:
    """Versions, git revision, time and machine in one dict for a manifest."""
    return {"versions": versions(), "git": git_revision(), "time": now(), "machine": machine()}
