"""The rule of benchmarks/table5_mini.py's table: which pre-trained rows count as a win (issue 17's terms)."""

from __future__ import annotations

import json

import pytest

from benchmarks import table5_mini as table5

SCRATCH_HELD_BACK = {"mini, L3": [66.0, 67.0, 68.0], "mini, L2 only": [66.0, 67.0, 68.0],
                     "scratch, L3": [51.0, 51.0, 51.0], "scratch, L2 only": [66.0, 67.0, 68.0]}


def test_a_win_that_needs_the_auxiliary_loss_to_hold_scratch_back_does_not_count():
    # mini L3 is 16 points above scratch L3, but scratch without L1 is as good: no win.
    assert table5.is_win(SCRATCH_HELD_BACK["mini, L3"], SCRATCH_HELD_BACK["scratch, L3"])
    assert not table5.counts_as_win(SCRATCH_HELD_BACK, "mini, L3", "scratch, L3")


def test_a_win_is_more_than_two_standard_errors_of_the_difference_over_both_scratch_rows():
    column = {"mini, L3": [70.0, 71.0, 72.0], "mini, L2 only": [67.0, 68.0, 69.0],
              "scratch, L3": [60.0, 61.0, 62.0], "scratch, L2 only": [66.0, 67.0, 68.0]}
    # Standard errors 0.58 each: 2 s.e. of a difference is 1.63 points. 71 - 67 = 4 wins; 68 - 67 = 1 does not.
    assert table5.counts_as_win(column, "mini, L3", "scratch, L3")
    assert not table5.counts_as_win(column, "mini, L2 only", "scratch, L2 only")
    assert table5.mean_and_error([70.0, 71.0, 72.0]) == pytest.approx((71.0, 0.57735), rel=1e-4)


def test_the_doc_shows_only_the_tasks_whose_twelve_runs_are_scored(tmp_path, monkeypatch):
    ledger_path, doc = tmp_path / "scores.json", tmp_path / "finetuning.md"
    scores = {run.name: value for row, values in SCRATCH_HELD_BACK.items()
              for run, value in zip(table5.row_runs(tmp_path, "sst2", row), values)}
    scores["cola/mini-L3/seed0"] = 5.0  # one run of a task: not a column yet
    ledger_path.write_text(json.dumps(scores))
    doc.write_text("# Fine-tuning\n\n## Table 5 in miniature\nold text\n\n### Pilots\nkept\n")
    monkeypatch.setattr(table5, "DOC", doc)
    table5.write_doc(table5.Ledger(ledger_path), {})
    text = doc.read_text()
    assert "old text" not in text and "### Pilots\nkept\n" in text
    assert "Not complete yet: 4 of 32 (task, row) cells" in text
    header = next(line for line in text.splitlines() if line.startswith("| | "))
    assert header == "| | sst2 (accuracy, validation) |"  # no cola column, no average
    assert "| mini, L3 | 67.0 ± 0.6 |" in text and "| mini, L3: win? | no |" in text


def test_a_complete_table_has_the_average_and_says_whether_the_target_is_met():
    clear_win = {"mini, L3": [70.0, 71.0, 72.0], "mini, L2 only": [66.0, 67.0, 68.0],
                 "scratch, L3": [60.0, 61.0, 62.0], "scratch, L2 only": [66.0, 67.0, 68.0]}
    winning = table5.TASKS[:4]  # mini L3 wins on these four, ties elsewhere
    scores = {row: {task: (clear_win if task in winning else SCRATCH_HELD_BACK)[row] for task in table5.TASKS}
              for row in table5.ROWS}
    lines = table5.table(scores, list(table5.TASKS))
    assert lines[0].endswith(" | average |")
    # Average per seed: mini L3 (4 x 70 + 4 x 66) / 8 = 68.0 in seed 0; scratch L2 only 66.0; scratch L3 55.5.
    assert lines[2] == "| mini, L3 | " + " | ".join(["71.0 ± 0.6"] * 4 + ["67.0 ± 0.6"] * 4) + " | 69.0 ± 0.6 |"
    assert lines[-1] == ("Wins that count: mini, L3 on 4 of 8 tasks and on the average (the target); mini, L2 only "
                         "on 0 of 8 tasks and not on the average. The target is at least 4 of the 8 tasks and the "
                         "average.")
    # One win fewer: 3 of 8, and the average's lead (1.5 points) falls under 2 s.e. of the difference (1.63).
    scores["mini, L3"][winning[0]] = SCRATCH_HELD_BACK["mini, L3"]
    assert "mini, L3 on 3 of 8 tasks and not on the average;" in table5.table(scores, list(table5.TASKS))[-1]
