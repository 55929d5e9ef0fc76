"""Which GPT-1-shaped model can a 2-core CPU pre-train in two hours, and ship in 25 MB? (issue 17)

Each candidate keeps GPT-1's shape (the real 40,478-token BPE vocabulary, post-LN blocks, tied head,
MLP 4x wide) and varies width, depth, context and batch. For each it builds the real train step
(`pretrain.compile_pretraining` with the released code's Adam), times `--steps` updates after one
warm-up, and reports parameters, the size of the parameters in bfloat16 (the shipped checkpoint),
tokens per second, and the tokens two hours would see, also as passes over the mini recipe's 17
training books (`local:corpus/gutenberg/*-0.txt`: 4,390,641 tokens).

    python benchmarks/mini_sizing.py [--candidates 128x4,192x4,...] [--steps 5] [--no-doc]

Rewrites the `## Mini pre-training sizing (CPU)` section of docs/benchmarks.md unless --no-doc.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import jax
import numpy as np
from doc_section import publish

SECTION = "## Mini pre-training sizing (CPU)"
CORPUS_TOKENS = 4_390_641  # configs/mini_pretrain.py's training books, as tokenized by its first run
BUDGET_S = 2 * 3600
# name: (width, n_layer, n_head, n_ctx, batch)
CANDIDATES = {
    "128x4": (128, 4, 4, 128, 16),
    "128x6": (128, 6, 4, 128, 16),
    "192x4": (192, 4, 4, 128, 16),
    "192x6": (192, 6, 6, 128, 16),
    "192x6-ctx256": (192, 6, 6, 256, 8),
    "256x4": (256, 4, 4, 128, 16),
}


def time_candidate(width: int, n_layer: int, n_head: int, n_ctx: int, batch: int, steps: int) -> dict:
    from configs import gpt1_pretrain
    from gpt1_jax import optim, pretrain, sharding, train_lib

    config = gpt1_pretrain.get_config()
    config.model.update(dict(width=width, n_layer=n_layer, n_head=n_head, mlp_width=4 * width, n_ctx=n_ctx))
    config.train.batch_size = batch
    model_cfg = pretrain.model_config(config)
    total = config.train.num_steps
    schedule = optim.learning_rate_schedule(config.optimizer, total)
    abstract = jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0))
    optimizer = optim.make_optimizer(config.optimizer, total, abstract)
    compiled = pretrain.compile_pretraining(config, model_cfg, optimizer, schedule)
    state = train_lib.place_state(pretrain.initial_params(model_cfg, 0), optimizer, compiled)
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch, n_ctx + 1), dtype=np.int32)
    global_batch = sharding.global_batch(tokens, compiled.mesh)
    state, metrics = compiled.train_step(state, global_batch)  # compiles
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled.train_step(state, global_batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    return {"params": params, "bf16_mb": params * 2 / 1e6, "step_s": seconds, "tokens_s": batch * n_ctx / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.candidates.split(","):
        width, n_layer, n_head, n_ctx, batch = CANDIDATES[name]
        r = time_candidate(width, n_layer, n_head, n_ctx, batch, args.steps)
        budget_tokens = r["tokens_s"] * BUDGET_S
        rows.append(f"| {name} | {width} x {n_layer}, {n_head} heads | {n_ctx} x {batch} | {r['params'] / 1e6:.1f}M | "
                    f"{r['bf16_mb']:.1f} MB | {r['step_s']:.2f} s | {r['tokens_s']:,.0f} | "
                    f"{budget_tokens / 1e6:.1f}M ({budget_tokens / CORPUS_TOKENS:.1f} passes) |")
        print(rows[-1], flush=True)
    text = "\n".join([
        SECTION, "",
        f"`python benchmarks/mini_sizing.py --steps {args.steps}`, {datetime.date.today()}, {platform.machine()} "
        f"CPU ({jax.device_count()} device), jax {jax.__version__}: the real train step of each candidate on random "
        "tokens, after one compiling step. The 25 MB limit is on the parameters in bfloat16.", "",
        "| candidate | model | context x batch | parameters | bfloat16 | per update | tokens/s | tokens in 2 h |",
        "|---|---|---|---:|---:|---:|---:|---:|", *rows])
    publish(SECTION, text, write=not args.no_doc)


if __name__ == "__main__":
    main()
