"""What does taking L1 on the real tokens alone save? The fine-tuning step with the LM head on every padded
position against the head on the gathered real targets only, on the table's tasks, alternating in one process.

Fine-tuning rows are padded to the longest example of the task, so most positions of a batch are padding,
and under L3 the tied 40k-way LM head is most of a small model's step. `finetune.needed_lm_target_slots`
sizes a gather to the most real targets any batch of the run holds; `losses.real_target_nll_sums` scores
those alone. Both variants are the real jit-compiled step (`finetune.compile_finetune`, the `mini` preset
of Table 5 in miniature, started from the shipped mini model, L3 with lambda 0.5) fed the run's own first
batches; after a warm-up step each, they alternate step by step on the same batch sequence, so background
load hits both alike. Reports the median step and the ratio.

    GPT1_JAX_DATA=../shared/data python benchmarks/lm_gather_step.py [--tasks sst2,stsb,rte,mrpc]
        [--steps 6] [--no-doc]

Rewrites the generated part of the ``## L1 on the real tokens (CPU)`` section of docs/benchmarks.md
unless --no-doc.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.doc_section import publish  # noqa: E402

SECTION = "## L1 on the real tokens (CPU)"


def measure(task: str, steps: int) -> dict:
    """Median step seconds of both variants on `task`, with the batch's shape and the slots."""
    import jax

    from benchmarks.table5_mini import preset_config
    from gpt1_jax import finetune, optim, tasks, train_lib
    from gpt1_jax.data import task_inputs

    config = preset_config(task)
    config.init = "mini"
    spec = tasks.get_task(task)
    model_cfg, params, _ = finetune.build_params(config, spec, config.seed)
    data = task_inputs.load(config, spec, model_cfg.n_ctx)
    total = config.finetune.epochs * finetune.steps_per_epoch(len(data.train), config)
    schedule = optim.learning_rate_schedule(config.optimizer, total)
    optimizer = optim.make_optimizer(config.optimizer, total, jax.eval_shape(lambda p: p, params))
    slots = finetune.needed_lm_target_slots(data.train, config)
    variants = {"every position": 0, "real targets only": slots}
    runs = {}
    for name, n_slots in variants.items():
        compiled, _ = finetune.compile_finetune(config, model_cfg, spec, optimizer, schedule, n_slots)
        state = train_lib.place_state(params, optimizer, compiled)
        batches = list(itertools.islice(finetune.epoch_batches(data, config, total, 0, compiled.mesh), steps + 1))
        state, metrics = compiled.train_step(state, batches[0])  # compiles
        jax.block_until_ready(metrics)
        runs[name] = {"compiled": compiled, "state": state, "batches": batches[1:], "times": []}
    for i in range(steps):
        for run in runs.values():
            start = time.perf_counter()
            run["state"], metrics = run["compiled"].train_step(run["state"], run["batches"][i])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)
    positions = config.train.batch_size * data.train.tokens.shape[1] * (data.seq_len - 1)
    real = task_inputs.lm_target_counts(data.train).sum() / (len(data.train) * data.train.tokens.shape[1]
                                                            * (data.seq_len - 1))
    return {"task": task, "rows": data.train.tokens.shape[1], "seq": data.seq_len, "positions": positions,
            "real": float(real), "slots": slots,
            **{name: statistics.median(run["times"]) for name, run in runs.items()}}


def render(results: list[dict], args) -> str:
    lines = [
        SECTION, "",
        f"`python benchmarks/lm_gather_step.py --tasks {args.tasks} --steps {args.steps}` on "
        f"{datetime.date.today()}, {platform.machine()}, 2 CPU cores. The real fine-tuning step of Table 5 in "
        "miniature (`mini` preset, batch 32, L3, from the shipped mini model), median of "
        f"{args.steps} steps per variant after a warm-up step, the variants alternating step by step in one "
        "process. Positions: the L1 targets of a batch as padded (examples x rows x (context - 1)); real: "
        "the fraction of them that are tokens; slots: the positions the gathered head scores per batch "
        "(the most real targets of any batch of the run, rounded up to 64).", "",
        "| task | rows x context | positions | real | slots | every position s | real targets only s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['task']} | {r['rows']} x {r['seq']} | {r['positions']:,} | {r['real']:.2f} | "
                     f"{r['slots']:,} | {r['every position']:.3f} | {r['real targets only']:.3f} | "
                     f"{r['every position'] / r['real targets only']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="sst2,stsb,rte,mrpc")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    results = []
    for task in args.tasks.split(","):
        results.append(measure(task, args.steps))
        print(results[-1], flush=True)
    text = render(results, args)
    publish(SECTION, text, write=not args.no_doc)


if __name__ == "__main__":
    main()
