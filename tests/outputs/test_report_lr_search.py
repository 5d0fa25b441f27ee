"""The report's learning-rate search table: every candidate, its validation metric, the choice."""
from __future__ import annotations

import json

from rankscope.outputs.report import lr_search_frame


def test_the_search_table_marks_the_chosen_rate_of_each_method(tmp_path):
    assert lr_search_frame(tmp_path) is None                   # a sweep without a search
    (tmp_path / "lr_search.json").write_text(json.dumps({
        "candidates": [
            {"method": "full", "rank": None, "lr": 1e-4, "validation": {"loss": 2.0}},
            {"method": "full", "rank": None, "lr": 3e-4, "validation": {"loss": 1.5}},
            {"method": "lora", "rank": 4, "lr": 1e-3, "validation": {"loss": 1.4}}],
        "chosen": {"full": {"lr": 3e-4}, "lora": {"lr": 1e-3}}}))
    (tmp_path / "sweep.yaml").write_text("task: news\n")
    df = lr_search_frame(tmp_path)
    assert df["rank"].isna().tolist() == [True, True, False] and df["rank"].iloc[2] == 4
    assert df.drop(columns="rank").to_dict("records") == [
        {"method": "full", "lr": 1e-4, "validation loss": 2.0, "chosen": False},
        {"method": "full", "lr": 3e-4, "validation loss": 1.5, "chosen": True},
        {"method": "lora", "lr": 1e-3, "validation loss": 1.4, "chosen": True}]
