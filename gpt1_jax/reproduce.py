"""`gpt1-reproduce` (`python -m gpt1_jax.reproduce`): the paper's fine-tuning tables (Tables 2-4) in one command.

Fine-tunes each task with the paper's recipe (configs/finetune.py:TASK) from `--init`, one after another, in
`--workdir`/TASK (race/middle in race-middle), then writes report.md there (ours beside the paper's numbers, also
printed) and the curves in plots/. Rerunning the same command skips the finished tasks and resumes the
interrupted one from its checkpoints. SIGTERM or Ctrl-C saves the running task and stops the queue (exit status
128 + the signal's number). A task that fails does not stop the others; it is reported at the end with its exit
status and its last error line (its whole output is in TASK/reproduce.log), and the exit status is 1.

    gpt1-reproduce --init=openai-gpt --workdir runs/paper [--tasks rte,cola] [--config.KEY=VALUE ...]
    gpt1-reproduce --init=mini --preset mini --tasks sst2,rte --workdir runs/mini-tables

`--config.KEY=VALUE` overrides go to every task's train.py as they are; `--dry_run` prints the commands.
"""

from __future__ import annotations

import codecs
import shlex
import sys
from typing import Callable

from absl import flags

from gpt1_jax import cli, recipe_flags, storage
from gpt1_jax.errors import UserError
from gpt1_jax.finetuning import task_queue
from gpt1_jax.finetuning.tasks import TASKS

SYNOPSIS = ("--init=INIT --workdir DIR [--tasks all|TASK,...] [--preset paper|mini|tiny] [--dry_run] "
            "[--config.KEY=VALUE ...]")
REPORT_FILE = "report.md"
PLOTS_FOLDER = "plots"
FAILED_STATUS = 1
SET_PER_TASK = {"task": "--tasks", "init": "--init"}  # config keys the queue sets, and the flag that sets them


class ReproduceError(UserError, ValueError):
    """A `--config.*` override that the queue cannot pass on to every task."""


def _define_flags(flag_values: flags.FlagValues) -> None:
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("init", None, "The starting point of every task, as train.py's --config.init takes it: a "
                        "checkpoint folder, mini, openai-gpt (the released GPT-1 from the Hugging Face Hub), "
                        "hf:ORG/NAME[@REV], hf:FOLDER, openai:FOLDER; --init= trains from scratch.", **define)
    flags.mark_flag_as_required("init", **define)
    flags.DEFINE_string("workdir", None, "Each task is fine-tuned in DIR/TASK; report.md and plots/ go in DIR.",
                        **define)
    flags.mark_flag_as_required("workdir", **define)
    cli.define_choices("tasks", ["all"], ["all", *TASKS], "The tasks, in this order; all: the 14 runs of the "
                       "paper's Tables 2-4 (wnli is not one).", flag_values=flag_values)
    flags.DEFINE_enum("preset", "paper", task_queue.PRESETS, "paper: configs/finetune.py:TASK; mini or tiny: "
                      "configs/finetune.py:mini or :tiny with config.task=TASK, CPU-sized runs.", **define)
    flags.DEFINE_boolean("dry_run", False, "Print the command of each task still to run, and exit.", **define)


def _task_names(chosen: list[str]) -> list[str]:
    """`--tasks` with `all` expanded, each task once, in the order given."""
    names = [name for choice in chosen for name in (task_queue.paper_tasks() if choice == "all" else [choice])]
    return list(dict.fromkeys(names))


def _check_overrides(overrides: list[str], recipe: str) -> None:
    """Refuses an override that every task would fail on before the first starts, rather than once per task."""
    for override in overrides:
        key, equals, _ = override[len("--config."):].partition("=")
        if not equals:
            raise ReproduceError(f"{override}: write --config.KEY=VALUE, one argument, to pass it to every task.")
        if key in SET_PER_TASK:
            raise ReproduceError(f"{override}: the queue sets config.{key} for each task; use {SET_PER_TASK[key]}.")
    unknown = recipe_flags.unknown_override(["--config", recipe, *overrides])
    if unknown is not None:
        raise unknown


def _say(text: str) -> None:
    """Our lines go to stderr with the tasks' output, so that stdout holds the report alone."""
    print(text, file=sys.stderr, flush=True)


def _echo() -> Callable[[bytes], None]:
    """Writes a task's output as it comes; a chunk may end inside a UTF-8 character (the progress bar's blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def echo(chunk: bytes) -> None:
        sys.stderr.write(decoder.decode(chunk))
        sys.stderr.flush()

    return echo


Failure = tuple[task_queue.Task, task_queue.TaskRun]  # a task that failed, and how its run ended


def _run_queue(queue: list[task_queue.Task], stop: task_queue.StopForwarding) -> tuple[list[Failure],
                                                                                        task_queue.Task | None]:
    """Runs the unfinished tasks in order; returns the failed ones, and the task a stop request interrupted
    (None: no stop, or one that came between tasks)."""
    failed: list[Failure] = []
    trained_seconds: list[float] = []
    for number, task in enumerate(queue, 1):
        if stop.requested:
            break
        where = f"[{number}/{len(queue)}] {task.name}"
        if task.finished:
            _say(f"{where}: finished before ({task.folder / task_queue.RESULTS_FILE}); skipped.")
            continue
        resuming = task.started
        left = sum(not later.finished for later in queue[number - 1:])
        _say(f"{where}: {'resuming' if resuming else 'fine-tuning'} in {task.folder}; "
             f"{task_queue.time_left(trained_seconds, left)}.")
        ended = task_queue.run(task, stop, _echo())
        if task.finished:
            if not resuming:  # a resumed task took only part of its time
                trained_seconds.append(ended.seconds)
            _say(f"{where}: finished in {task_queue.duration(ended.seconds)}.")
        elif stop.requested:
            return failed, task
        else:
            failed.append((task, ended))
            _say(f"{where}: failed ({ended.status}): {ended.error_line}")
    return failed, None


def _report(workdir: storage.Path, queue: list[task_queue.Task]) -> None:
    """report's table of ours against the paper for the finished tasks, written and printed, and their curves."""
    # Imported here: they load matplotlib and the metrics' readers, which the queue itself never needs.
    from gpt1_jax.plots import PlotError, plot_run
    from gpt1_jax.results_table import render

    finished = [task.folder for task in queue if task.finished]
    if not finished:
        _say("No task has finished: no report.")
        return
    table = render(finished)
    storage.write_whole(workdir / REPORT_FILE, table)
    print(table, end="", flush=True)
    for folder in finished:
        try:
            plot_run(folder, workdir / PLOTS_FOLDER)
        except PlotError as err:  # the table is written; the other tasks still get their curves
            _say(f"No curves for {folder.name}: {err}")
    _say(f"Wrote {workdir / REPORT_FILE} and the curves in {workdir / PLOTS_FOLDER}.")


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.reproduce` (`gpt1-reproduce`); `argv` excludes the program name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [arg for arg in argv if arg.startswith("--config.")]
    command = cli.parse([arg for arg in argv if not arg.startswith("--config.")], _define_flags,
                        prog="python -m gpt1_jax.reproduce", synopsis=SYNOPSIS, doc=__doc__)
    args, names = command.flags, _task_names(command.flags.tasks)
    if not names:
        command.fail("--tasks names no task; give all or some of them")
    workdir = storage.path(args.workdir)
    queue = task_queue.plan(names, workdir=workdir, preset=args.preset, init=args.init, overrides=overrides)
    _check_overrides(overrides, task_queue.recipe(names[0], args.preset))
    if args.dry_run:
        for task in queue:
            print(f"# {task.name}: finished ({task.folder / task_queue.RESULTS_FILE}), skipped" if task.finished
                  else shlex.join(task.command))
        return
    with task_queue.StopForwarding() as stop:
        failed, interrupted = _run_queue(queue, stop)
    for task, ended in failed:
        _say(f"{task.name} failed ({ended.status}): {ended.error_line}\n"
             f"  its output: {task.folder / task_queue.LOG_FILE}")
    if stop.requested:
        during, resumes = "", ""
        if interrupted:
            during = f" during {interrupted.name}"
            resumes = f", and {interrupted.name} resumes from its checkpoints in {interrupted.folder}"
        _say(f"Stopped by {stop.signal_name}{during}. Rerun the same command to go on: finished tasks are "
             f"skipped{resumes}.")
        raise SystemExit(128 + stop.signal_number)
    _report(workdir, queue)
    if failed:
        raise SystemExit(FAILED_STATUS)


if __name__ == "__main__":
    main()
