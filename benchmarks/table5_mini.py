"""The paper's Table 5 in miniature: does the shipped mini model's pre-training help, with and without L1?

Four rows with identical settings (gpt1_jax/configs/finetune.py:mini, one learning rate), as in Sec. 5:
  mini, L3        the shipped mini model (`init=mini`), L3 = L2 + 0.5 L1,
  mini, L2        the same without the auxiliary LM loss (lm_coef 0),
  scratch, L3     the same shape from a fresh draw, L3,
  scratch, L2     ... without the auxiliary loss,
on eight of the paper's tasks, 3 seeds each. Each cell is the mean and standard error over seeds of the
task's metric on the split the paper reports (the best epoch chosen on the first dev split, as
`results.json` says). A pre-trained row counts as a win on a task when it beats scratch under the same
objective *and* the better of the two scratch rows by more than 2 standard errors of the difference: a
win that only exists because the auxiliary loss holds scratch back does not count.

shared/data lacks the training sets of SciTail and QNLI, so those two train on their dev split less 374
held-out examples (`finetune.train_from_eval`, as Story Cloze always does): SciTail is then scored on its
labelled test set, QNLI on the 374 held-out dev pairs (the issue's "QNLI (dev)").

Every run is `train.py` in its own process and workdir under --out, so the table is resumable: a killed
run resumes from its checkpoints, and a finished one's score goes into docs/table5_mini_scores.json, which
is committed: a run scored there is never trained again, on this machine or the next (the table takes
longer than one working session on a laptop). Delete it when the preset or the mini model changes. It rewrites the
"Table 5 in miniature" section of docs/finetuning.md. --layers adds Figure 2 (left) in miniature: the
first k of 4 blocks transferred, k = 0..4, on one task, run first and drawn to docs/layer_transfer_mini.png
as soon as its runs are scored (`--tasks sst2 --layers` runs just those).

    pip install -e . && GPT1_JAX_DATA=../shared/data python benchmarks/table5_mini.py --out runs/table5 --layers
    python benchmarks/table5_mini.py --out runs/table5 --doc_only [--no_doc]   # the doc from the ledger alone

Many hours on 2 cores (--jobs 2: two runs at a time, each on its own core): on RTE about 6 minutes a run
with L1 and 3 without, longer on the sentence-pair tasks; hence the committed ledger.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time

from absl import flags
from doc_section import publish

from gpt1_jax import cli
from gpt1_jax.finetuning import tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ROOT / "gpt1_jax" / "configs"  # the recipe files

DOC = ROOT / "docs" / "finetuning.md"
HEADING = "## Table 5 in miniature"
PLOT = ROOT / "docs" / "layer_transfer_mini.png"
LEDGER = ROOT / "docs" / "table5_mini_scores.json"
TASKS = ("sst2", "cola", "mrpc", "rte", "scitail", "story_cloze", "qnli", "stsb")
ROWS = {  # name -> (init, lm_coef)
    "mini, L3": ("mini", 0.5),
    "mini, L2 only": ("mini", 0.0),
    "scratch, L3": ("", 0.5),
    "scratch, L2 only": ("", 0.0),
}
SEEDS = (0, 1, 2)
TARGET_WINS = len(TASKS) // 2  # issue 17: a pre-trained row wins on at least half the tasks, and the average
LAYER_TASK = "sst2"


def preset_config(task: str):
    """The config every run of the table fine-tunes `task` with, before its row's init, lm_coef and seed."""
    from gpt1_jax.configs import finetune

    config = finetune.get_config("mini")
    config.task = task
    config.finetune.train_from_eval = True
    return config


def reported_split(task: str) -> str:
    """The split the paper reports for `task` when we score it (SciTail's and Story Cloze's test), else dev."""
    spec = tasks.TASKS[task]
    return next((split for split in spec.paper if split in spec.eval_splits), spec.eval_splits[0])


class Ledger:
    """The committed scores of finished runs, {run name: score}, rewritten whole after each run."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.scores = json.loads(path.read_text()) if path.exists() else {}
        self.lock = threading.Lock()

    def record(self, name: str, score: float) -> None:
        with self.lock:
            self.scores[name] = score
            partial = self.path.with_suffix(".partial")
            partial.write_text(json.dumps(dict(sorted(self.scores.items())), indent=1) + "\n")
            os.replace(partial, self.path)


@dataclasses.dataclass(frozen=True)
class Run:
    """One fine-tuning run of the table: `train.py` in its own process, in the workdir `out/name`."""

    out: pathlib.Path
    name: str
    task: str
    init: str
    lm_coef: float
    seed: int
    extra: tuple[str, ...] = ()

    @property
    def workdir(self) -> pathlib.Path:
        return self.out / self.name

    def result(self) -> float:
        """The task's primary metric x 100 on its reported split, from the run's results.json."""
        saved = json.loads((self.workdir / "results.json").read_text())
        return 100 * saved["dev"][reported_split(self.task)][saved["metric"]]

    def train(self, core: int | None, ledger: Ledger) -> None:
        """Runs train.py (pinned to one CPU core when `core` is given) unless the ledger has its score."""
        if self.name in ledger.scores:
            return
        if (self.workdir / "results.json").exists():
            ledger.record(self.name, self.result())
            return
        command = [sys.executable, str(ROOT / "train.py"), "--config", f"{RECIPES / 'finetune.py'}:mini",
                   "--workdir", str(self.workdir), f"--config.task={self.task}", f"--config.init={self.init}",
                   f"--config.finetune.lm_coef={self.lm_coef}", f"--config.seed={self.seed}",
                   "--config.finetune.train_from_eval=True", *self.extra]
        start = time.perf_counter()
        log = self.workdir.parent / f"{self.workdir.name}.log"
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        pin = None if core is None else (lambda: os.sched_setaffinity(0, {core}))
        with open(log, "w") as out:
            done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pin)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed with exit status {done.returncode}; see {log}")
        ledger.record(self.name, self.result())
        print(f"  {self.name}: {time.perf_counter() - start:.0f} s", flush=True)


def jax_backend() -> str:
    """The backend the runs will get ("cpu", "gpu", "tpu"), asked in a child process: starting JAX here would
    make this parent hold the accelerator (and on a GPU most of its memory) while the runs need it."""
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                           text=True, check=True)
    return probe.stdout.strip().splitlines()[-1]


def train_all(runs: list[Run], jobs: int, ledger: Ledger) -> None:
    """Trains the runs not yet scored, `jobs` at a time; with more than one job on a CPU each process gets its own
    core, so that two runs do not fight over the same two cores' threads. On an accelerator none is pinned: the
    runs compute on the device, and a pinned process compiles for it on one core (12 pinned runs on one H200
    had not finished compiling after 7 minutes; one unpinned compiled in under a minute)."""
    pending = queue.Queue()
    for run in runs:
        pending.put(run)
    cores = sorted(os.sched_getaffinity(0))
    pin = jobs > 1 and jax_backend() == "cpu"

    def worker(index: int) -> None:
        while True:
            try:
                run = pending.get_nowait()
            except queue.Empty:
                return
            run.train(cores[index % len(cores)] if pin else None, ledger)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for finished in [pool.submit(worker, index) for index in range(jobs)]:
            finished.result()


def mean_and_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def is_win(ours: list[float], theirs: list[float]) -> bool:
    """`ours` beats `theirs` by more than 2 standard errors of the difference of their means."""
    (a, se_a), (b, se_b) = mean_and_error(ours), mean_and_error(theirs)
    return a - b > 2 * math.hypot(se_a, se_b)


def table(scores: dict[str, dict[str, list[float]]], done: list[str]) -> list[str]:
    """Markdown rows over the tasks in `done`: one per row of ROWS, cells `mean ± se`, then a "win?" row per
    pre-trained row; the average over tasks (per seed) is a column once every task is done. Last, a line counting
    the wins, and once the table is complete whether a row meets the issue's target (4 of 8 and the average)."""
    complete = len(done) == len(TASKS)
    averages = {row: [sum(scores[row][t][i] for t in TASKS) / len(TASKS) for i in range(len(SEEDS))]
                for row in ROWS} if complete else {}
    header = "| | " + " | ".join(f"{t} ({tasks.TASKS[t].primary_metric}, {reported_split(t)})" for t in done)
    lines = [header + (" | average |" if complete else " |"), "|---|" + "---:|" * (len(done) + complete)]
    for row in ROWS:
        cells = [scores[row][t] for t in done] + ([averages[row]] if complete else [])
        lines.append(f"| {row} | " + " | ".join("%.1f ± %.1f" % mean_and_error(c) for c in cells) + " |")
    tally = []
    for pretrained, objective in (("mini, L3", "scratch, L3"), ("mini, L2 only", "scratch, L2 only")):
        columns = [{row: scores[row][t] for row in ROWS} for t in done] + ([averages] if complete else [])
        wins = [counts_as_win(column, pretrained, objective) for column in columns]
        lines.append(f"| {pretrained}: win? | " + " | ".join("**yes**" if w else "no" for w in wins) + " |")
        task_wins = sum(wins[:len(done)])
        tally.append(f"{pretrained} on {task_wins} of {len(done)} tasks" + (
            f" and {'' if wins[-1] else 'not '}on the average" if complete else ""))
        if complete and task_wins >= TARGET_WINS and wins[-1]:
            tally[-1] += " (the target)"
    lines += ["", "Wins that count: " + "; ".join(tally) + (
        f". The target is at least {TARGET_WINS} of the {len(TASKS)} tasks and the average." if complete
        else " so far.")]
    return lines


def counts_as_win(column: dict[str, list[float]], pretrained: str, objective: str) -> bool:
    """The pre-trained row beats scratch under the same objective and the better scratch row (by mean)."""
    best_scratch = max(("scratch, L3", "scratch, L2 only"), key=lambda row: mean_and_error(column[row])[0])
    return is_win(column[pretrained], column[objective]) and is_win(column[pretrained], column[best_scratch])


def row_runs(out: pathlib.Path, task: str, row: str) -> list[Run]:
    """The runs over seeds of one row of ROWS on one task."""
    init, lm_coef = ROWS[row]
    folder = f'{task}/{row.replace(", ", "-").replace(" ", "_")}'
    return [Run(out, f"{folder}/seed{seed}", task, init, lm_coef, seed) for seed in SEEDS]


def layer_runs(out: pathlib.Path) -> dict[int, list[Run]]:
    """{k: runs over seeds} with the first k blocks (and the embeddings) of the mini model transferred, L3.

    All 4 blocks is the table's "mini, L3" row on the same task, so those runs serve as k = 4."""
    curve = {k: [Run(out, f"layers/k{k}/seed{seed}", LAYER_TASK, "mini", 0.5, seed,
                     (f"--config.finetune.transfer_layers={k}",)) for seed in SEEDS] for k in range(4)}
    return {**curve, 4: row_runs(out, LAYER_TASK, "mini, L3")}


def draw_layer_curve(curve: dict[int, list[float]], scratch: dict[str, list[float]]) -> None:
    """The curve with a band per scratch row: scratch under L3 is held at the majority class by L1, so the
    band without the auxiliary loss is the one the curve has to clear."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(curve)
    means, errors = zip(*(mean_and_error(curve[k]) for k in ks))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label="first k blocks of the mini model")
    for (row, values), color in zip(scratch.items(), ("grey", "tab:orange")):
        mean, error = mean_and_error(values)
        axis.axhspan(mean - error, mean + error, color=color, alpha=0.3, label=row)
        axis.axhline(mean, color=color, linewidth=1)
    axis.set_xlabel("layers transferred")
    axis.set_ylabel(f"{LAYER_TASK} {tasks.TASKS[LAYER_TASK].primary_metric} (%)")
    axis.set_xticks(ks)
    axis.set_title("Figure 2 (left) in miniature: 3 seeds, mean ± s.e.")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)


def _define_flags(flag_values: flags.FlagValues) -> None:
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("out", None, "The runs' workdirs; reruns skip done runs.", **define)
    flags.mark_flag_as_required("out", flag_values=flag_values)
    flags.DEFINE_boolean("layers", False, "Also the layer-transfer curve (Figure 2 left).", **define)
    cli.define_choices("tasks", TASKS, TASKS, "A subset to run now (the doc shows complete tasks).", flag_values)
    flags.DEFINE_integer("jobs", min(2, len(os.sched_getaffinity(0))), "Runs at a time (default: 2, or 1 on a "
                         "1-core machine); on a CPU each is pinned to its own core.", **define)
    flags.DEFINE_string("ledger", str(LEDGER), "The scores file (default: the committed one; another machine's "
                        "table keeps its own).", **define)
    flags.DEFINE_boolean("doc_only", False, "Train nothing: rewrite the doc section (and the curve) from the "
                         "ledger's scores.", **define)
    flags.DEFINE_boolean("no_doc", False, f"Print the section only; by default it is written to "
                         f"{DOC.relative_to(ROOT)} and the curve drawn to {PLOT.relative_to(ROOT)}.", **define)


def main(argv: list[str] | None = None) -> None:
    command_line = cli.parse(argv, _define_flags, prog="python benchmarks/table5_mini.py",
                             synopsis="--out DIR [--layers] [--tasks A,B] [--jobs N] [--doc_only] [--no_doc]",
                             doc=__doc__)
    args = command_line.flags
    out, ledger_path = pathlib.Path(args.out), pathlib.Path(args.ledger)
    curve = layer_runs(out) if args.layers else {}
    if args.doc_only:
        write_doc(Ledger(ledger_path), curve, write=not args.no_doc)
        return
    if not os.environ.get("GPT1_JAX_DATA"):
        command_line.fail("set GPT1_JAX_DATA to the data root (../shared/data here): the table runs on the local files")
    runs = {(task, row): row_runs(out, task, row) for task in args.tasks for row in ROWS}
    ledger = Ledger(ledger_path)
    # The curve first: its runs are short (one task), and the figure is complete once they are.
    curve_runs = curve.values() if LAYER_TASK in args.tasks else ()
    train_all([run for group in [*curve_runs, *runs.values()] for run in group], args.jobs, ledger)
    for (task, row), group in runs.items():
        print(f"{task:12s} {row:18s} " + "%.1f ± %.1f" % mean_and_error([ledger.scores[r.name] for r in group]))
    write_doc(ledger, curve, write=not args.no_doc)


def write_doc(ledger: Ledger, curve: dict[int, list[Run]], *, write: bool = True) -> None:
    """The doc section from the ledger: the tasks whose runs are all scored, and the layer curve (drawn to
    PLOT) once its runs are; while tasks remain, it says so and how to go on. Printed only, unless `write`."""
    everything = {(task, row): row_runs(pathlib.Path(), task, row) for task in TASKS for row in ROWS}
    scored = {key: [ledger.scores.get(run.name) for run in group] for key, group in everything.items()}
    done = [task for task in TASKS if all(None not in scored[task, row] for row in ROWS)]
    scores = {row: {task: scored[task, row] for task in done} for row in ROWS}
    if len(done) == len(TASKS):
        text = [HEADING, "", "Generated by `benchmarks/table5_mini.py` (its docstring has the rows and the rule for "
                "a win); every task on the preset's 1,000 training examples (all, where fewer), 3 epochs, lr 1e-3.",
                "", *table(scores, done)]
    else:
        runs_done = sum(None not in values for values in scored.values())
        text = [HEADING, "", f"Not complete yet: {runs_done} of {len(everything)} (task, row) cells have all "
                f"{len(SEEDS)} seeds. `benchmarks/table5_mini.py` runs the rest (4 rows x 8 tasks x 3 seeds, plus "
                "the layer curve) and rewrites this part, the table growing as tasks complete:", "",
                "    GPT1_JAX_DATA=../shared/data python benchmarks/table5_mini.py --out runs/table5 --layers", "",
                "It takes longer than a working session on 2 cores: two runs at a time, a run on RTE takes about 6 "
                "minutes with L1 and 3 without, one with L3 on MRPC's sentence pairs took 20-35 before L1 was taken "
                "on the real tokens alone (1.7x faster a step). Each finished run's score goes into "
                "`docs/table5_mini_scores.json`, which is committed, so the next machine goes on where this one "
                "stopped. Generated from it (3 seeds each, mean ± standard error, same settings in every row: "
                "1,000 training examples, 3 epochs, lr 1e-3; each cell is the task's metric x 100):"]
        text += ["", *table(scores, done)] if done else []
    curve_scores = {k: [ledger.scores.get(run.name) for run in group] for k, group in curve.items()}
    if curve_scores and LAYER_TASK in done and all(None not in values for values in curve_scores.values()):
        if write:
            scratch = {row: scored[LAYER_TASK, row] for row in ("scratch, L3", "scratch, L2 only")}
            draw_layer_curve(curve_scores, scratch)
        text += ["", f"Layers transferred on {LAYER_TASK} (L3, 3 seeds): " + ", ".join(
            f"{k}: %.1f ± %.1f" % mean_and_error(curve_scores[k]) for k in sorted(curve_scores)) +
            f" (`{PLOT.relative_to(ROOT)}`; the scratch rows are drawn as bands)."]
    # A blank line before the hand-written subsections.
    publish(HEADING, "\n".join(text) + "\n", write=write, doc=DOC)


if __name__ == "__main__":
    main()
