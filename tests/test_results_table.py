"""One results table for cliptune-eval, cliptune-train and cliptune-distill (cliptune.eval.runner.metrics_table):
the same layout rules in all three, each with its own rows and columns."""

from __future__ import annotations

from rich.console import Console

from cliptune.eval.runner import metrics_table
from cliptune.eval.runner import results_table as eval_table
from cliptune.train.distill import results_table as distill_table
from cliptune.train.run import results_table as train_table


def _text(table, width: int = 200) -> str:
    console = Console(record=True, width=width, force_terminal=False)
    console.print(table)
    return console.export_text()


BEFORE = {"s": {"t2i_R@1": 0.25, "mean_R": 0.125, "loss": 2.0}}
AFTER = {"s": {"t2i_R@1": 0.5, "mean_R": 0.375, "loss": 1.5}}
CHANCE = {"s": {"t2i_R@1": 0.0625, "mean_R": 0.0625}}
DISTILL = ({"p": {"en_R@1": 0.1, "zh_R@1": 0.2, "en_cos": 0.3, "zh_cos": 0.4, "mean_R": 0.15, "loss": 9.0}},
           {"p": {"en_R@1": 0.9, "zh_R@1": 0.8, "en_cos": 0.95, "zh_cos": 0.85, "mean_R": 0.85, "loss": 0.5}},
           {"p": {"en_R@1": 0.033, "zh_R@1": 0.033, "mean_R": 0.033}})


def _rows(table) -> list[list[str]]:
    cols = [list(c.cells) for c in table.columns]
    return [[c[i] for c in cols] for i in range(table.row_count)]


def test_train_and_distill_tables_show_before_after_and_chance():
    t = train_table(BEFORE, AFTER, CHANCE, skipped={"train": {"truncated": 2}, "val": {"s": {"truncated": 0}}})
    assert [c.header for c in t.columns] == ["set", "model", "t2i R@1", "mean_R", "loss"]
    assert _rows(t) == [["s", "before", "0.250", "0.125", "2.000"], ["", "after", "0.500", "0.375", "1.500"],
                        ["", "chance", "0.062", "0.062", ""]]
    assert [r.style for r in t.rows] == [None, "bold", "dim"]
    assert t.caption.startswith("training: 2 skipped: 2 truncated") and "s:" not in t.caption  # sets without skips: out
    d = distill_table(*DISTILL)
    assert [c.header for c in d.columns] == ["set", "model", "en R@1", "zh R@1", "en_cos", "zh_cos", "mean_R", "loss"]
    assert _rows(d)[1] == ["", "after", "0.900", "0.800", "0.950", "0.850", "0.850", "0.500"]
    assert [r.style for r in d.rows] == [None, "bold", "dim"] and d.caption is None


def test_eval_table_shows_each_set_with_its_chance_and_counts():
    res = {"s": {"metrics": {"t2i_R@1": 0.5, "mean_R": 0.4}, "chance": {"t2i_R@1": 0.01}, "n_images": 100,
                 "n_texts": 200, "n_skipped": 3, "skipped": {"truncated": 3}},
           "e": {"metrics": {}, "n_images": 0, "n_texts": 0, "error": "empty"}}
    t = eval_table(res)
    assert [c.header for c in t.columns] == ["set", "images", "texts", "skipped", "t2i R@1", "mean_R"]
    assert _rows(t) == [["s", "100", "200", "3", "0.500", "0.400"], ["  chance", "", "", "", "0.010", ""],
                        ["e", "0", "0", "", "-", "-"]]
    assert [r.style for r in t.rows] == [None, "dim", None]
    assert t.caption == "s: 3 skipped: 3 truncated (" + t.caption.split("(", 1)[1]


def test_no_value_is_cut_on_a_narrow_console():
    """Every table wraps a cell rather than cutting it to '0.0…' (the training table alone did)."""
    res = {"a_long_set_name": {"metrics": {f"{d}_R@{k}": 0.123456 for d in ("t2i", "i2t") for k in (1, 5, 10)},
                               "n_images": 1000, "n_texts": 5000}}
    for table in (eval_table(res), train_table(BEFORE, AFTER, CHANCE), distill_table(*DISTILL)):
        text = _text(table, width=40)
        assert "…" not in text, text


def test_rows_without_values_are_left_out():
    t = metrics_table("t", {"s": [("before", None), ("after", {"x": 1.0}), ("chance", {})]}, ["x", "y"])
    assert _rows(t) == [["s", "after", "1.000"]] and [c.header for c in t.columns] == ["set", "model", "x"]
