"""The paper's fine-tuning tables as a queue of `train.py` runs: one task after another, each in its own process.

`gpt1-reproduce` (gpt1_jax/reproduce.py) is the README's loop over the tasks of Tables 2-4, made restartable. Each
task is `python -m gpt1_jax.train_cli --config configs/finetune.py:TASK ...` (train.py's command) in a child
process rather than a call in this one, because:
- a crash, a bad data file or an out-of-memory kill in one task ends that process only: the queue reports it
  and starts the next task;
- what a run holds (device buffers, compiled programs, the task's arrays, JAX's caches) goes back to the system
  when its process ends, so the last task starts with the memory the first had.

The queue reads nothing of a run but train.py's own contract: `results.json` is written last and in one write
(finetune_results), so its presence says the task finished; a rerun in the same folder resumes from its
checkpoints; SIGTERM makes it save the update in flight and exit 0 (gpt1_jax.training.preemption).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import BinaryIO, Callable, Iterator, Sequence

from gpt1_jax import stop_signals, storage
from gpt1_jax.finetuning.tasks import TASKS

RESULTS_FILE = "results.json"  # finetune_results writes it last: a task with it has finished
LOG_FILE = "reproduce.log"  # the child's output, appended at every start of the task
TRAIN_MODULE = "gpt1_jax.train_cli"  # train.py's command, installed with the package (train.py is not)
PRESETS = ("paper", "mini", "tiny")  # configs/finetune.py:TASK, or its CPU-sized :mini / :tiny with config.task
_TAIL_BYTES = 64 * 1024  # the end of a run's output kept in memory, where its error line is
# Our entry points' one-line errors (`error: ...`, cli.reports_user_errors), or the last line of a traceback.
_ERROR_LINE = re.compile(r"^(error: |[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b)")


def paper_tasks() -> list[str]:
    """The runs of Tables 2-4, in the registry's order: 12 datasets, RACE as middle, high and all (14 runs)."""
    return [name for name, spec in TASKS.items() if spec.paper]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the queue: its name, its train.py workdir and the command that fine-tunes it there."""

    name: str
    folder: storage.Path
    command: tuple[str, ...]

    @property
    def finished(self) -> bool:
        return (self.folder / RESULTS_FILE).exists()

    @property
    def started(self) -> bool:
        """Whether a run has begun in the folder: train.py records its config at the first start."""
        return (self.folder / "config.json").exists()


def plan(names: Sequence[str], *, workdir: storage.Path, preset: str, init: str | None,
         overrides: Sequence[str]) -> list[Task]:
    """The queue: `names` in order, each fine-tuned in `workdir/<name>` (race/middle in race-middle, as the README's
    loop names them) from `init` (None: the recipe's), with the `--config.KEY=VALUE` `overrides` appended."""
    queue = []
    for name in names:
        folder = workdir / name.replace("/", "-")
        task_flag = [] if preset == "paper" else [f"--config.task={name}"]
        init_flag = [] if init is None else [f"--config.init={init}"]
        command = (sys.executable, "-m", TRAIN_MODULE, "--config", recipe(name, preset), *task_flag, *init_flag,
                   "--workdir", str(folder), *overrides)
        queue.append(Task(name, folder, command))
    return queue


def recipe(name: str, preset: str) -> str:
    """The `--config` of task `name`: the paper's recipe for it, or a CPU-sized preset (then `config.task` names
    the task)."""
    return f"configs/finetune.py:{name if preset == 'paper' else preset}"


class StopForwarding:
    """SIGTERM / SIGINT to the queue: passed on to the running task as SIGTERM, and no next task starts.

    The task's train.py then saves the update in flight and exits 0, so a rerun of the queue resumes it. It gets
    SIGTERM whichever signal the queue got: Ctrl-C in a terminal sends SIGINT to the whole foreground process
    group, the task included, and a second SIGINT makes train.py raise KeyboardInterrupt instead of saving,
    where a repeated SIGTERM only repeats the request. The task stays in the queue's process group, so a
    scheduler that kills the group (kill -9) ends both, and none is left holding a workdir.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self.signal_number = 0
        self._task: subprocess.Popen | None = None
        self._signals = contextlib.ExitStack()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopForwarding:
        self._signals.enter_context(stop_signals.sent_to(self._handle))
        return self

    def __exit__(self, *exc_info) -> None:
        self._signals.close()

    def watch(self, task: subprocess.Popen | None) -> None:
        """Forward to `task` from now on (None: no task runs); a stop requested before it started reaches it too."""
        self._task = task
        if self.requested:
            self._forward()

    def _handle(self, signum: int, frame) -> None:
        if not self.requested:
            self.signal_name, self.signal_number = signal.Signals(signum).name, signum
        self._forward()

    def _forward(self) -> None:
        if self._task is not None:
            with contextlib.suppress(ProcessLookupError):
                self._task.send_signal(signal.SIGTERM)  # Popen sends nothing to a process it has reaped


@dataclasses.dataclass(frozen=True)
class TaskRun:
    """How one start of a task's train.py ended."""

    returncode: int  # negative: killed by that signal (-9: SIGKILL, often the kernel's out-of-memory killer)
    seconds: float
    error_line: str  # the last line of its output that reads as an error, else its last line

    @property
    def status(self) -> str:
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exit status {self.returncode}"


def run(task: Task, stop: StopForwarding, echo: Callable[[bytes], None]) -> TaskRun:
    """Runs `task.command` to its end, its output (stdout and stderr, as they come) shown through `echo` and
    appended to the task's `reproduce.log`; a stop request reaches it through `stop`."""
    began = time.monotonic()
    tail = bytearray()
    with _appending(task.folder / LOG_FILE) as log:
        log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')}: {shlex.join(task.command)}\n".encode())
        # Unbuffered: its prints and log lines keep their order with the progress bar, which goes to stderr.
        with subprocess.Popen(task.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) as child:
            stop.watch(child)
            try:
                while chunk := child.stdout.read1(_TAIL_BYTES):
                    log.write(chunk)
                    log.flush()
                    echo(chunk)
                    tail += chunk
                    del tail[:-_TAIL_BYTES]
                returncode = child.wait()
            finally:
                stop.watch(None)
    return TaskRun(returncode, time.monotonic() - began, last_error_line(tail.decode("utf-8", "replace")))


@contextlib.contextmanager
def _appending(path: storage.Path) -> Iterator[BinaryIO]:
    """`path` open for appending. An object store has no append: there the log is uploaded whole at the end (a
    queue killed with -9 loses that start's part of it)."""
    if not storage.is_url(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as out:
            yield out
        return
    buffer = io.BytesIO(path.read_bytes() if path.exists() else b"")
    buffer.seek(0, io.SEEK_END)
    try:
        yield buffer
    finally:
        storage.write_whole(path, buffer.getvalue())


def last_error_line(output: str) -> str:
    """The line of `output` that says why a run failed: the last `error: ...` line or exception line (a
    traceback ends with it), else the last line. Progress bars redraw with carriage returns: each is a line."""
    lines = [line.strip() for line in re.split(r"[\r\n]", output) if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return errors[-1] if errors else (lines[-1] if lines else "")


def time_left(task_seconds: Sequence[float], tasks_left: int) -> str:
    """What is left, from the mean time of the tasks trained from start to end so far.

    Per task, not per step: a task's number of steps is known only once its data is read, in its own process.
    The paper's tasks differ in size by two orders of magnitude (RTE 2.5k examples, MNLI 393k), so this is a
    rough guide; each task's progress bar gives its own remaining time.
    """
    if not task_seconds:
        return "estimate after the first task"
    each = sum(task_seconds) / len(task_seconds)
    return (f"about {duration(each * tasks_left)} left for {tasks_left} task{'s' if tasks_left != 1 else ''} "
            f"({duration(each)} per task so far)")


def duration(seconds: float) -> str:
    """`42s`, `7m05s` or `3h08m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
