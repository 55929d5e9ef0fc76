"""Does checking for a stop request after every update cost anything?

`train_lib.run` asks after every update whether a SIGTERM/SIGINT arrived, whether `train.stop_at` or a
checkpoint is due (a TPU VM's preemption grace period is ~30 s, shorter than 50 updates of a large
model, so once per `log_every` is too late). This times, in one process and alternating round by
round, the same jit-compiled train step (`benchmarks/train_step.py`'s `JaxStep`, tiny config: the
fastest step we have, so the one where host work would show most) driven two ways:

  bare     the step alone, dispatched asynchronously as `run` dispatches it;
  checked  the step plus what `run` adds after each update so that a stop request is acted on within
           one update: it waits for the previous update (unbounded, asynchronous dispatch ran up to
           `log_every` updates ahead of the device, and a save on SIGTERM waited for all of them), and
           evaluates the stop conditions inside a real `StopRequest` (signal handlers installed).

It reports the median time per update of each, their ratio, and the conditions' own cost timed alone.

    python benchmarks/stop_check.py [--config tiny] [--steps 40] [--rounds 5] [--no-doc]

Rewrites the `## Stop check (CPU)` section of docs/benchmarks.md unless --no-doc.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
import timeit

import jax
from doc_section import publish
from train_step import JaxStep

SECTION = "## Stop check (CPU)"


def run_bare(bench: JaxStep, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        bench.state, metrics = bench.step_fn(bench.state, bench.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def host_checks(stop, done: int, stop_at: int, every: int, total: int, save_due) -> bool:
    """The conditions `train_lib.run` evaluates after update `done` (single process)."""
    pause = done == stop_at
    return (done % every == 0 or done == total or save_due(done) or stop.requested or pause) and (
        pause or stop.requested)


def run_checked(bench: JaxStep, steps: int, stop) -> float:
    save_due = lambda done: False  # noqa: E731 - the Recipe default
    start = time.perf_counter()
    in_flight = None
    for done in range(1, steps + 1):
        bench.state, metrics = bench.step_fn(bench.state, bench.batch)
        jax.block_until_ready(in_flight)  # as `run`: at most one update ahead of the device
        in_flight = metrics
        if host_checks(stop, done, 0, 1_000_000, 1_000_000, save_due):
            break
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    from gpt1_jax.preemption import StopRequest

    bench = JaxStep(args.config, {})
    run_bare(bench, 10)  # warm-up
    bare, checked = [], []
    with StopRequest() as stop:
        for _ in range(args.rounds):
            bare.append(run_bare(bench, args.steps))
            checked.append(run_checked(bench, args.steps, stop))
        check_s = min(timeit.repeat(lambda: host_checks(stop, 7, 0, 1_000_000, 1_000_000, lambda d: False),
                                    number=100_000, repeat=5)) / 100_000
    b, c = statistics.median(bare), statistics.median(checked)
    spread = (max(bare) - min(bare)) / b
    lines = [
        SECTION, "",
        f"`python benchmarks/stop_check.py --config {args.config} --steps {args.steps} --rounds {args.rounds}`, "
        f"{datetime.date.today()}, {platform.machine()} CPU, jax {jax.__version__}. Median of {args.rounds} "
        f"alternating rounds of {args.steps} updates each.", "",
        "| loop | time per update | ratio to bare |", "|---|---|---|",
        f"| bare (the step alone) | {b * 1e3:.2f} ms | 1.000 |",
        "| checked (the step + `run`'s wait for the previous update and stop checks) | "
        f"{c * 1e3:.2f} ms | {c / b:.3f} |", "",
        f"The checks alone take {check_s * 1e9:.0f} ns per update ({check_s / b:.1e} of a tiny update); "
        f"the bare loop's own rounds spread by {spread:.1%}, and the checked loop differs by {c / b - 1:+.1%}: "
        + ("within that spread, not measurable." if abs(c / b - 1) <= spread else "more than that spread."),
    ]
    text = "\n".join(lines)
    publish(SECTION, text, write=not args.no_doc)


if __name__ == "__main__":
    main()
