"""The CLI's error contract, checked the same way by every test of a verb's bad input."""
from __future__ import annotations


def assert_one_line_error(res, *fragments, out=None):
    """Exit status 2 by SystemExit, one ``rankscope: error: …`` line on stderr holding every
    fragment, nothing on stdout, and (when ``out`` is given) no output folder left behind."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rankscope: error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert res.stdout == ""
    if out is not None:
        assert not out.exists()
