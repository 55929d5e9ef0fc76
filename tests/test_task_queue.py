"""The queue of train.py runs behind gpt1-reproduce: its commands, the error line of a failed run, the estimate."""

import pathlib
import sys

from gpt1_jax.finetuning import task_queue


def test_each_task_gets_its_folder_and_the_recipe_of_its_preset(tmp_path):
    paper, tiny = (task_queue.plan(["race/middle"], workdir=tmp_path, preset=preset, init="mini",
                                   overrides=["--config.seed=1"])[0] for preset in ("paper", "tiny"))
    assert paper.folder == tmp_path / "race-middle" and paper.command[0] == sys.executable
    assert paper.command[3:] == ("--config", "configs/finetune.py:race/middle", "--config.init=mini",
                                 "--workdir", str(tmp_path / "race-middle"), "--config.seed=1")
    assert tiny.command[3:6] == ("--config", "configs/finetune.py:tiny", "--config.task=race/middle")


def test_all_is_the_fourteen_runs_of_the_papers_tables():
    tasks = task_queue.paper_tasks()
    assert len(tasks) == 14 and "wnli" not in tasks and tasks[-1] == "sst2"


def test_the_error_line_is_the_last_error_or_exception_not_the_progress_bar_after_it():
    bar = "fine-tune rte:  50%|#####     | 1/2\rfine-tune rte: 100%|##########| 2/2\n"
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    raise ValueError(x)\nValueError: no\n"
    assert task_queue.last_error_line(bar + "error: data/train.tsv:4: label 'maybe'\n" + bar) == (
        "error: data/train.tsv:4: label 'maybe'")
    assert task_queue.last_error_line(traceback + "W some warning\n") == "ValueError: no"
    assert task_queue.last_error_line(bar) == "fine-tune rte: 100%|##########| 2/2"


def test_the_estimate_is_the_mean_task_time_times_the_tasks_left():
    assert task_queue.time_left([], 3) == "estimate after the first task"
    assert task_queue.time_left([60, 120], 4).startswith("about 6m00s left for 4 tasks (1m30s per task")
    assert task_queue.duration(3 * 3600 + 8 * 60 + 5) == "3h08m"


def test_a_folder_with_results_json_is_finished(tmp_path: pathlib.Path):
    task = task_queue.plan(["rte"], workdir=tmp_path, preset="paper", init=None, overrides=[])[0]
    assert not task.finished and "--config.init" not in " ".join(task.command)
    task.folder.mkdir()
    (task.folder / task_queue.RESULTS_FILE).write_text("{}")
    assert task.finished
