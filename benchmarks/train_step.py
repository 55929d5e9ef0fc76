"""How fast is our jit-compiled train step, compared with transformers' PyTorch GPT-1 on the same CPU?

Both sides do the same update on the same batch: forward with the LM loss (objective L1, Sec. 3.1),
backward, global-norm clipping at 1.0 and Adam with decoupled decay (0.9, 0.999, 1e-8, decay 0.01 on
matrices only), dropout 0.1 in train mode, float32. Ours is the real step (`pretrain.compile_pretraining`
with `optim.make_optimizer`, whose default is the released code's Adam: the same element-wise work as
AdamW); the reference is `OpenAIGPTLMHeadModel` in eager PyTorch with
`torch.optim.AdamW`.

Each framework runs in its own subprocess (so peak host memory, ru_maxrss, is its own). After
set-up and warm-up the parent alternates the two processes round by round, so background load on a
shared machine hits both alike; the reported time is the median step. Model FLOPs are
`pretrain.train_flops_per_token`; the "matmul rate" is each framework's own square float32 matmul
in the same run, and "model FLOP/s / matmul rate" is the fraction of it the step sustains.

    python benchmarks/train_step.py [--configs full,small,tiny] [--rounds 3] [--steps 1] [--no_doc]
    python benchmarks/train_step.py --configs tiny --rounds 1 --warmup 0 --matmul 256 --no_doc  # a smoke run

Rewrites the generated part of the ``## Train step (CPU)`` section of docs/benchmarks.md (up to its
``### What was tried`` notes) unless --no_doc. One run of the defaults takes 6-7 minutes on 2 cores.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

from absl import flags
from doc_section import define_doc_flags, publish

from gpt1_jax import cli

BENCHMARKS = pathlib.Path(__file__).resolve().parent
SECTION = "## Train step (CPU)"
# name: (model overrides, batch, n_ctx, loss_chunk); all use the full 40,478-token vocabulary.
CONFIGS = {
    "full": (dict(), 2, 512, 0),
    "small": (dict(width=256, n_head=4, n_layer=4, mlp_width=1024), 8, 128, 0),
    "tiny": (dict(width=64, n_head=2, n_layer=2, mlp_width=256), 16, 64, 0),
}
MATMUL = 2048  # side of the square matmul that calibrates each framework's matmul rate (--matmul)
# A worker process runs `worker` on its JSON arguments: the command line is the parent's alone.
WORKER = "import json, sys, train_step; train_step.worker(*json.loads(sys.argv[1]))"


def lm_flops_per_token(name: str) -> float:
    from gpt1_jax.model.transformer import GPT1Config
    from gpt1_jax.pretraining.pretrain import train_flops_per_token

    overrides, _, n_ctx, _ = CONFIGS[name]
    return train_flops_per_token(GPT1Config(n_ctx=n_ctx, **overrides), n_ctx)


class JaxStep:
    """Our real train step, built the way `pretrain.pretrain` builds it."""

    def __init__(self, name: str, extra: dict):
        import jax
        import numpy as np

        from gpt1_jax.configs import gpt1_pretrain
        from gpt1_jax.pretraining import pretrain
        from gpt1_jax.training import optim, sharding, train_lib

        overrides, batch, n_ctx, chunk = CONFIGS[name]
        config = gpt1_pretrain.get_config()
        config.model.update(dict(overrides, n_ctx=n_ctx, **extra.get("model", {})))
        config.train.batch_size, config.train.loss_chunk = batch, extra.get("loss_chunk", chunk)
        model_cfg = pretrain.model_config(config)
        total = config.train.num_steps
        try:  # this tree: the optimizer takes typed options
            from gpt1_jax.run_options import optimizer_options
            optimizer_options = optimizer_options(config)
        except ImportError:  # a baseline tree from before them: the config section
            optimizer_options = config.optimizer
        schedule = optim.learning_rate_schedule(optimizer_options, total)
        optimizer = optim.make_optimizer(
            optimizer_options, total, jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0)))
        compiled = pretrain.compile_pretraining(config, model_cfg, optimizer, schedule)
        self.state = train_lib.place_state(pretrain.initial_params(model_cfg, 0), optimizer, compiled)
        tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (batch, n_ctx + 1), dtype=np.int32)
        self.batch = sharding.global_batch(tokens, compiled.mesh)
        start = time.perf_counter()
        self.step_fn = compiled.train_step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.tokens = batch * n_ctx

    def step(self) -> float:
        self.state, metrics = self.step_fn(self.state, self.batch)
        return float(metrics["loss"])

    @staticmethod
    def matmul_flops(side: int) -> float:
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (side, side), jnp.float32)
        mm = jax.jit(lambda x: x @ x)
        mm(a).block_until_ready()
        return _best_rate(lambda: mm(a).block_until_ready(), side)


class TorchStep:
    """transformers' OpenAIGPTLMHeadModel, eager, with the same optimizer and clipping."""

    def __init__(self, name: str):
        import torch
        from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

        overrides, batch, n_ctx, _ = CONFIGS[name]
        width = overrides.get("width", 768)
        cfg = OpenAIGPTConfig(vocab_size=40478, n_positions=n_ctx, n_embd=width,
                              n_layer=overrides.get("n_layer", 12), n_head=overrides.get("n_head", 12),
                              resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        torch.manual_seed(0)
        self.model = OpenAIGPTLMHeadModel(cfg).train()
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8)
        self.ids = torch.randint(0, 40478, (batch, n_ctx), generator=torch.Generator().manual_seed(0))
        self.compile_s = float("nan")
        self.tokens = batch * n_ctx
        self.torch = torch

    def step(self) -> float:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    @staticmethod
    def matmul_flops(side: int) -> float:
        import torch

        a = torch.randn(side, side)
        return _best_rate(lambda: a @ a, side)


def _best_rate(fn, side: int, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 2 * side**3 / min(times)


def worker(framework: str, name: str, warmup: int, extra: dict, matmul: int) -> None:
    """Build, warm up, print 'ready', then run `n` timed steps per 'go n' line read from stdin."""
    setup_start = time.perf_counter()
    runner = JaxStep(name, extra) if framework == "jax" else TorchStep(name)
    for _ in range(warmup):
        runner.step()
    info = {"compile_s": runner.compile_s, "setup_s": time.perf_counter() - setup_start,
            "matmul_flops": runner.matmul_flops(matmul)}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line.split()[1])):
            start = time.perf_counter()
            loss = runner.step()
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times, "loss": loss,
                          "maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}), flush=True)


def measure(name: str, args: flags.FlagValues, extra: dict) -> dict:
    """Both frameworks on one config, alternating rounds of `args.steps` timed steps."""
    procs, results = {}, {}
    rounds, steps = args.rounds, args.steps
    for framework in ("torch", "jax"):
        arguments = [framework, name, args.warmup, extra, args.matmul]
        # From benchmarks/, the worker's sys.path is this script's: gpt1_jax is the installed one, or PYTHONPATH's.
        proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(arguments)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=BENCHMARKS)
        procs[framework] = proc
        results[framework] = {**json.loads(proc.stdout.readline()), "times": []}
    for _ in range(rounds):
        for framework, proc in procs.items():
            proc.stdin.write(f"go {steps}\n")
            proc.stdin.flush()
            out = json.loads(proc.stdout.readline())
            results[framework]["times"] += out["times"]
            results[framework].update(loss=out["loss"], maxrss_gb=out["maxrss_gb"])
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    flops = lm_flops_per_token(name)
    _, batch, n_ctx, _ = CONFIGS[name]
    for r in results.values():
        r["step_s"] = statistics.median(r["times"])
        r["tokens_per_s"] = batch * n_ctx / r["step_s"]
        r["model_flops"] = flops * r["tokens_per_s"]
    results["ratio"] = results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
    return results


def versions() -> str:
    import jax
    import torch
    import transformers

    return f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"


def render(results: dict, args) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        SECTION, "",
        f"`python benchmarks/train_step.py --configs {','.join(args.configs)} --rounds {args.rounds} "
        f"--steps {args.steps}{'' if args.matmul == MATMUL else f' --matmul {args.matmul}'}` on "
        f"{datetime.date.today().isoformat()}, {cpu}, {os.cpu_count()} CPU cores (shared with other jobs), "
        f"{versions()}; float32, dropout 0.1 in train mode, Adam with decoupled decay + clipping at 1.0 on both "
        "sides (ours: the released code's Adam, torch: AdamW). "
        f"XLA_FLAGS=`{os.environ.get('XLA_FLAGS', '')}`. Median of {args.rounds * args.steps} steps after "
        f"{args.warmup} warm-up step(s), the two frameworks alternating round by round; peak memory is each "
        "subprocess's ru_maxrss. The matmul rate is each framework's own "
        f"{args.matmul}^3 float32 matmul in the same run (no published peak for this shared virtual CPU, so no MFU).",
        "",
        "| config | batch x ctx | framework | step s | tokens/s | model GFLOP/s | / own matmul rate | "
        "compile s | peak RSS GB | ours / torch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        _, batch, n_ctx, _ = CONFIGS[name]
        for framework, label in (("torch", "transformers eager"), ("jax", "gpt1_jax jit")):
            r = res[framework]
            compile_s = "-" if framework == "torch" else f"{r['compile_s']:.1f}"
            ratio = f"**{res['ratio']:.2f}x**" if framework == "jax" else ""
            lines.append(
                f"| {name} | {batch} x {n_ctx} | {label} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
                f"{r['model_flops'] / 1e9:.0f} | {r['model_flops'] / r['matmul_flops']:.0%} | {compile_s} | "
                f"{r['maxrss_gb']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


def _define_flags(flag_values: flags.FlagValues) -> None:
    define_doc_flags(flag_values)
    define = dict(flag_values=flag_values)
    cli.define_choices("configs", ["full", "small", "tiny"], CONFIGS, "The configs to time.", flag_values)
    flags.DEFINE_integer("rounds", 3, "Rounds, the frameworks alternating.", **define)
    flags.DEFINE_integer("steps", 1, "Timed steps per framework per round.", **define)
    flags.DEFINE_integer("warmup", 1, "Untimed steps after the set-up.", **define)
    flags.DEFINE_integer("matmul", MATMUL, "Side of the square float32 matmul that calibrates each framework's "
                         "matmul rate.", **define)
    flags.DEFINE_string("extra", "{}", "JSON overrides for ours: {'model': {...}, 'loss_chunk': n}.", **define)


def main(argv: list[str] | None = None) -> None:
    command_line = cli.parse(argv, _define_flags, prog="python benchmarks/train_step.py",
                             synopsis="[--configs full,small,tiny] [--rounds N] [--steps N] [--no_doc]", doc=__doc__)
    args = command_line.flags
    extra = json.loads(args.extra)
    results = {}
    for name in args.configs:
        results[name] = measure(name, args, extra)
        print(name, json.dumps({k: v if k == "ratio" else {m: x for m, x in v.items() if m != "times"}
                                for k, v in results[name].items()}), flush=True)
    publish(SECTION, render(results, args), write=not args.no_doc)


if __name__ == "__main__":
    main()
