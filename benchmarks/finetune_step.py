"""What does following the released code cost the fine-tuning step? Faithful defaults against the fast options
and against the code before it (issue 13), alternating in one run on the same CPU.

Variants, each the real jit-compiled step of `finetune.compile_finetune` on a multiple-choice task
(two rows per example, every token real, dropout 0.1 everywhere, float32):
- `released`: this tree's defaults (`finetune.lm_softmax_rows="all"`: the LM softmax also covers the
  run's position rows; the LM head multiplies by the dropped table; `optimizer.kind="released"`);
- `tokens`: this tree with `finetune.lm_softmax_rows="tokens"`;
- `tokens_adamw`: the same with `optimizer.kind="adamw"` (separates the optimizer's share);
- `previous`: the tree at `--baseline` (default: the commit before this work), checked out in a
  temporary git worktree and imported from there (token rows only, clean head table, optax.adamw).

Each variant runs in its own subprocess; after set-up and warm-up the parent alternates them round by
round, so background load hits all alike, and reports the median step and the ratio to `previous`.

    python benchmarks/finetune_step.py [--configs gpt1,small] [--variants released,tokens,previous]
        [--rounds 5] [--baseline 11cc920] [--no_doc]
    python benchmarks/finetune_step.py --configs tiny --variants released,tokens --rounds 1 --no_doc  # a smoke run

Each GPT-1-sized variant holds ~6 GB, so on a 24 GB machine run at most three at once. A worker runs
`worker` through `python -c` with the variant's tree first on PYTHONPATH, not through this file's command
line: the baseline tree may predate `gpt1_jax.cli`, which parses the command line.

Rewrites the generated part of the ``## Fine-tuning step (CPU)`` section of docs/benchmarks.md unless --no_doc.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Iterator

from absl import flags
from doc_section import define_doc_flags, publish

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = pathlib.Path(__file__).resolve().parent
SECTION = "## Fine-tuning step (CPU)"
BASELINE = "11cc920"  # the last commit before the released-code parity work
# name: (model sizes, examples per batch, context); two rows per example, all with the full vocabulary.
CONFIGS = {
    "gpt1": (dict(), 1, 512),
    "small": (dict(width=256, n_head=4, n_layer=4, mlp_width=1024), 8, 128),
    "tiny": (dict(width=64, n_head=2, n_layer=2, mlp_width=256), 2, 64),
}
# name: config overrides ("section.key": value) applied in the worker; "previous" runs the baseline tree.
VARIANTS = {"released": {}, "tokens": {"finetune.lm_softmax_rows": "tokens"},
            "tokens_adamw": {"finetune.lm_softmax_rows": "tokens", "optimizer.kind": "adamw"}, "previous": {}}
# A worker process runs `worker` on its JSON arguments, importing gpt1_jax from its variant's tree.
WORKER = "import json, sys, finetune_step; finetune_step.worker(*json.loads(sys.argv[1]))"


def worker(name: str, overrides: dict, warmup: int) -> None:
    """Build the real fine-tuning step, warm up, print 'ready' info, then time `n` steps per 'go n' line."""
    import jax
    import numpy as np

    import gpt1_jax
    from gpt1_jax.configs import finetune as recipe
    from gpt1_jax.finetuning import tasks
    from gpt1_jax.training import optim, sharding, train_lib

    try:  # this tree: the starting points in a module of their own
        from gpt1_jax.finetuning.finetune import compile_finetune
        from gpt1_jax.finetuning.finetune_start import build_params
    except ImportError:
        try:  # a baseline tree with starting points and the step in one module
            from gpt1_jax.finetuning.finetune import build_params, compile_finetune
        except ImportError:  # a baseline tree from before the fine-tuning modules were merged
            from gpt1_jax.finetune_init import build_params
            from gpt1_jax.finetune_lib import compile_finetune

    sizes, examples, seq = CONFIGS[name]
    config = recipe.get_config("story_cloze")
    config.model.update(dict(sizes, n_ctx=seq))
    config.train.batch_size = examples
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    spec = tasks.get_task("story_cloze")
    try:  # this tree: the optimizer takes typed options
        from gpt1_jax.run_options import optimizer_options
        optimizer_options = optimizer_options(config)
    except ImportError:  # a baseline tree from before them: the config section
        optimizer_options = config.optimizer
    model_cfg, params, _ = build_params(config, spec, 0)
    total = 10_000
    schedule = optim.learning_rate_schedule(optimizer_options, total)
    optimizer = optim.make_optimizer(optimizer_options, total, jax.eval_shape(lambda: params))
    compiled, _ = compile_finetune(config, model_cfg, spec, optimizer, schedule)
    state = train_lib.init_state(jax.tree.map(jax.numpy.asarray, params), optimizer)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 40478, (examples, 2, seq), dtype=np.int32),
             "mask": np.ones((examples, 2, seq), np.float32),
             "classify_positions": np.full((examples, 2), seq - 1, np.int32),
             "labels": rng.integers(0, 2, examples).astype(np.int32), "weights": np.ones(examples, np.float32)}
    inputs = sharding.global_batch(batch, compiled.mesh)
    start = time.perf_counter()
    step = compiled.train_step.lower(state, inputs).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = step(state, inputs)
        jax.block_until_ready(metrics)
    print(json.dumps({"compile_s": compile_s, "package": str(pathlib.Path(gpt1_jax.__file__).parent)}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line.split()[1])):
            begin = time.perf_counter()
            state, metrics = step(state, inputs)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - begin)
        print(json.dumps({"times": times, "loss": float(metrics["loss"])}), flush=True)


def measure(name: str, roots: dict[str, pathlib.Path], rounds: int, steps: int, warmup: int) -> dict:
    procs, results = {}, {}
    for variant, root in roots.items():
        arguments = json.dumps([name, VARIANTS[variant], warmup])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(BENCHMARKS)]))
        procs[variant] = subprocess.Popen([sys.executable, "-c", WORKER, arguments], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, cwd=root, env=env)
        results[variant] = {**json.loads(procs[variant].stdout.readline()), "times": []}
        if pathlib.Path(results[variant]["package"]).parent != root:
            raise RuntimeError(f"variant {variant} imported gpt1_jax from {results[variant]['package']}, not {root}")
    for _ in range(rounds):
        for variant, proc in procs.items():
            proc.stdin.write(f"go {steps}\n")
            proc.stdin.flush()
            out = json.loads(proc.stdout.readline())
            results[variant]["times"] += out["times"]
            results[variant]["loss"] = out["loss"]
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    for r in results.values():
        r["step_s"] = statistics.median(r["times"])
    return results


def render(results: dict, args) -> str:
    import jax

    lines = [
        SECTION, "",
        f"`python benchmarks/finetune_step.py --configs {','.join(args.configs)} --variants "
        f"{','.join(args.variants)} --rounds "
        f"{args.rounds} --steps {args.steps} --baseline {args.baseline}` on {datetime.date.today().isoformat()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"jax {jax.__version__}. The real fine-tuning step (multiple choice, 2 rows per example, every token "
        "real, dropout 0.1, float32); median of "
        f"{args.rounds * args.steps} steps per variant after {args.warmup} warm-up step(s), the variants "
        "alternating round by round in their own processes.",
        "",
        "| config | examples x rows x ctx | variant | step s | / previous |",
        "|---|---|---|---:|---:|",
    ]
    labels = {"released": "released code (defaults: all rows, dropped head table, released Adam)",
              "tokens": "`lm_softmax_rows=tokens`", "tokens_adamw": "`lm_softmax_rows=tokens`, `optimizer.kind=adamw`",
              "previous": f"previous code ({args.baseline})"}
    for name, res in results.items():
        _, examples, seq = CONFIGS[name]
        for variant, r in res.items():
            ratio = r["step_s"] / res["previous"]["step_s"] if "previous" in res else float("nan")
            lines.append(f"| {name} | {examples} x 2 x {seq} | {labels[variant]} | {r['step_s']:.3f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def baseline_tree(revision: str | None) -> Iterator[pathlib.Path | None]:
    """`revision` checked out in a temporary git worktree, removed afterwards; None: no worktree."""
    if revision is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="gpt1_jax_baseline_") as tmp:
        tree = pathlib.Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def _define_flags(flag_values: flags.FlagValues) -> None:
    from gpt1_jax import cli  # here, not at the top: a worker imports this module with the baseline's gpt1_jax

    define_doc_flags(flag_values)
    define = dict(flag_values=flag_values)
    cli.define_choices("configs", ["gpt1", "small"], CONFIGS, "The configs to time.", flag_values)
    cli.define_choices("variants", ["released", "tokens", "previous"], VARIANTS, "The variants to time.",
                       flag_values)
    flags.DEFINE_integer("rounds", 5, "Rounds, the variants alternating.", **define)
    flags.DEFINE_integer("steps", 1, "Timed steps per variant per round.", **define)
    flags.DEFINE_integer("warmup", 1, "Untimed steps after the compile.", **define)
    flags.DEFINE_string("baseline", BASELINE, "Git revision whose code is the 'previous' variant.", **define)


def main(argv: list[str] | None = None) -> None:
    from gpt1_jax import cli  # here, not at the top: a worker imports this module with the baseline's gpt1_jax

    command_line = cli.parse(argv, _define_flags, prog="python benchmarks/finetune_step.py",
                             synopsis="[--configs gpt1,small] [--variants A,B] [--rounds N] [--baseline REV] "
                             "[--no_doc]", doc=__doc__)
    args = command_line.flags
    with baseline_tree(args.baseline if "previous" in args.variants else None) as baseline:
        roots = {variant: baseline if variant == "previous" else ROOT for variant in args.variants}
        results = {}
        for name in args.configs:
            results[name] = measure(name, roots, args.rounds, args.steps, args.warmup)
            print(name, json.dumps({v: {k: x for k, x in r.items() if k != "times"}
                                    for v, r in results[name].items()}), flush=True)
    publish(SECTION, render(results, args), write=not args.no_doc)


if __name__ == "__main__":
    main()
