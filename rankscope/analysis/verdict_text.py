"""The verdict in words: the outcome, each test with its number, and what to run next."""
from __future__ import annotations

import pandas as pd

from rankscope.analysis.verdict import NOT_BEST_LEARNER, verdict_table

HEADLINE = {
    "holds": "**The hypothesis holds here:** a small rank is equivalent to full fine-tuning "
             "(its paired interval over held-out examples and seeds lies inside the margin fixed "
             "before the runs, or beats it at full fine-tuning's searched rate), and the full "
             "update keeps 90% of its gain at a low rank.",
    "refuted": "**The hypothesis is refuted here:** no tested LoRA rank matches full "
               "fine-tuning, and the full update needs a high rank to keep 90% of its gain.",
    "inconclusive": "**Inconclusive:** the runs cannot decide the question yet.",
}
NEXT = {   # (test, status) → what to run next
    ("full gained", "fail"): "full fine-tuning did not beat the base model: train longer or pick "
                             "its learning rate on a validation split",
    ("full plateaued", "fail"): "full fine-tuning was still improving: run more steps (or the "
                                "paper profile) until its last fifth adds little",
    ("full plateaued", "inconclusive"): "re-run the sweep with this version, which records the "
                                        "held-out metric at 80% of the learning-rate schedule",
    ("LoRA gained", "fail"): "some LoRA runs did not improve: run more steps or raise the LoRA "
                             "learning rate",
    ("equivalence", "inconclusive"): "decide the equivalence test: at least two seeds, as many "
                                     "held-out examples as its note names, or ranks above the "
                                     "largest where the differences lie beyond the margin",
    ("LoRA stable", "fail"): "a LoRA run trained unstably: search its learning rate at the "
                             "smallest and largest ranks too, or hold α constant in r (Hu et "
                             "al.'s protocol)",
    ("equivalence", "beaten"): "choose full fine-tuning's learning rate on a validation split, "
                               "or train it with full_scope: linear (the scope LoRA adapts)",
    ("equivalence", "fail"): "no tested rank is equivalent to full fine-tuning: train "
                             "longer (or the paper profile) and add ranks above the largest "
                             "tested, until the tests agree",
    ("equivalence", "skipped"): "run full fine-tuning and LoRA side by side (--methods full,lora)",
    ("functional rank", "skipped"): "add a full fine-tuning run so its update can be truncated",
    ("functional rank", "inconclusive"): "train full fine-tuning with full_scope: linear, so "
                                         "that only the linear update can carry the gain",
    ("functional rank", "between"): "the functional rank is neither low nor high: test more "
                                    "truncation ranks or a longer full run",
    ("shared direction", "fail"): "the top directions of different ranks overlap no more than "
                                  "chance: the LoRA factors may still sit near their "
                                  "initialisation; run more steps",
}


def verdict(frames: dict[str, pd.DataFrame]) -> tuple[str, dict]:
    """The verdict as Markdown, and its evidence ({"outcome", "tests": [rows]}).

    Raises:
        KeyError: ``frames`` has no metrics table.
    """
    outcome, table = verdict_table(frames)
    return markdown(outcome, table), {"outcome": outcome,
                                      "tests": table.astype(object).where(table.notna(), None)
                                      .to_dict("records")}


def markdown(outcome: str, table: pd.DataFrame) -> str:
    """verdict.md: the headline, one line per gate and test, and what to run next."""
    lines = ["## Verdict", "", HEADLINE[outcome], ""]
    for r in table.itertuples():
        value = "" if pd.isna(r.value) else f" = {_fmt(r.value)}"
        threshold = "" if pd.isna(r.threshold) else f" (threshold {_fmt(r.threshold)})"
        gate = f"; needs {r.gate}" if r.gate else ""
        lines.append(f"- **{r.test}**: {r.status}{value}{threshold}{gate}. {r.note}".rstrip())
    # a test made inconclusive by a failed gate gets no advice of its own: the gate's says
    # what to run (its own would name causes the runs may not have, e.g. one seed)
    keys = [(r.test, "beaten" if NOT_BEST_LEARNER in str(r.note) else r.status)
            for r in table.itertuples() if not str(r.note).startswith("gate failed")]
    todo = [NEXT[k] for k in keys if k in NEXT]
    if outcome != "holds" and todo:
        lines += ["", "What to run next: " + "; ".join(dict.fromkeys(todo)) + "."]
    lines += ["", COUNTERFACTUAL[outcome == "refuted"]]
    return "\n".join(lines) + "\n"


COUNTERFACTUAL = (  # what would turn the verdict: refuted for the others, holds for refuted
    "It would be refuted if every LoRA rank were worse than full fine-tuning beyond the margin and the "
    "full update needed a high rank to keep 90% of its gain.",
    "It would hold if a small LoRA rank were equivalent to full fine-tuning and the full "
    "update kept 90% of its gain at a low rank.")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
