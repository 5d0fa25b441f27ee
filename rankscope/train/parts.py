"""Deprecated: the names ``rankscope.analysis.truncate`` still reads as ``parts.<name>``.

Each lives in the module named for its job; import it from there. This module goes once no
caller is left (``grep -rn "train import parts"``).
"""
from rankscope.train.device import setup_dist, use_bf16
from rankscope.train.evaluation import evaluate
from rankscope.train.model_setup import load_task_model

__all__ = ["evaluate", "load_task_model", "setup_dist", "use_bf16"]
