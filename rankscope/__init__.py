"""rankscope: measure whether fine-tuning updates ΔW have a low intrinsic rank."""
from __future__ import annotations

__version__ = "0.1.0"


def analyze(*args, **kwargs):
    """Spectra of weight updates; see ``rankscope.analysis.analyze.analyze``."""
    from rankscope.analysis.analyze import analyze as _analyze

    return _analyze(*args, **kwargs)


__all__ = ["analyze", "__version__"]
