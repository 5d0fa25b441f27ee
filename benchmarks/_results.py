"""One marked section per benchmark script in RESULTS.md, replaced in place, written atomically."""
from __future__ import annotations

from pathlib import Path

from rankscope.store.atomic import atomic_write_text


def write_section(results: Path, script: str, body: str) -> None:
    """Replace ``script``'s section of ``results`` (between its begin/end markers) by ``body``.

    The other scripts' sections stay as they are; a missing file or section is created.
    """
    begin, end = f"<!-- benchmarks/{script}: begin -->", f"<!-- benchmarks/{script}: end -->"
    text = results.read_text() if results.is_file() else "# Benchmark results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)].rstrip("\n") + text[text.index(end) + len(end):]
    atomic_write_text(results, text.rstrip("\n") + f"\n\n{begin}\n{body.rstrip()}\n{end}\n")
