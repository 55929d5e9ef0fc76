"""GPT-1 pre-training throughput and MFU on the accelerator at hand, against transformers on the same device.

The issue's target: bfloat16 compute (float32 parameters and optimizer state), batch 64 x 512, the full
GPT-1 config, >= 45% MFU on an H100. Ours is the real step (`pretrain.compile_pretraining`, the paper's
optimizer, dropout 0.1); the reference is `OpenAIGPTLMHeadModel` in PyTorch with bfloat16 autocast and
fused AdamW on the same device, when torch sees one.

    python benchmarks/accelerator_step.py [--batch 64] [--steps 10] [--dtype bfloat16] [--loss_chunk 8192] \
        [--remat none] [--layers auto|scan|unrolled] [--attention auto|faithful|fused|fast] \
        [--head_backward compute|float32] [--profile DIR]
    python benchmarks/accelerator_step.py --sweep [--variants NAME,...]   # every lever side by side
    python benchmarks/accelerator_step.py --tiny --batch 4 --steps 2      # a smoke run on any machine

Prints one JSON line per framework (tokens/s, step seconds, compile seconds, MFU where the device's peak is
known: `pretrain.PEAK_FLOPS`, or `--peak_flops` per device). `--sweep` runs each of `VARIANTS` in a process
of its own (an XLA flag is read once, when jax starts), then transformers once, and prints a markdown table:
tokens/s, MFU, each variant against the first (the step before the levers) and against transformers.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import flags

from gpt1_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
# name: (this script's flags, XLA_FLAGS). The first is the step before the levers of docs/benchmarks.md's
# "Train step (accelerator)": the layer scan, softmax and dropout written out in XLA, the head's backward in
# float32. Each lever alone, then all three, then the XLA flags on top of them.
LEVERS = ["--layers=unrolled", "--attention=fused", "--head_backward=compute"]
VARIANTS = {
    "before": (["--layers=scan", "--attention=faithful", "--head_backward=float32"], ""),
    "unrolled": (["--layers=unrolled", "--attention=faithful", "--head_backward=float32"], ""),
    "fused-attention": (["--layers=scan", "--attention=fused", "--head_backward=float32"], ""),
    "bf16-head": (["--layers=scan", "--attention=faithful", "--head_backward=compute"], ""),
    "all": (LEVERS, ""),
    "all-unchunked-loss": ([*LEVERS, "--loss_chunk=0"], ""),
    "all-latency-hiding": (LEVERS, "--xla_gpu_enable_latency_hiding_scheduler=true"),
    "all-no-triton-gemm": (LEVERS, "--xla_gpu_enable_triton_gemm=false"),
}


def jax_step(args) -> dict:
    import jax
    import numpy as np

    from gpt1_jax import run_options
    from gpt1_jax.configs.common import base_config, model_section
    from gpt1_jax.pretraining import pretrain
    from gpt1_jax.training import optim, sharding, train_lib

    config = base_config()
    config.model = model_section(dtype=args.dtype, remat=args.remat, layers=args.layers, attention=args.attention,
                                 head_backward=args.head_backward,
                                 **(dict(n_ctx=64, width=64, n_head=2, n_layer=2, mlp_width=256) if args.tiny else {}))
    config.train.batch_size = args.batch
    config.train.loss_chunk = args.loss_chunk
    config.train.peak_flops = args.peak_flops
    model_cfg = pretrain.model_config(config)
    schedule = optim.learning_rate_schedule(run_options.optimizer_options(config), 10_000)
    abstract_params = jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0))
    optimizer = optim.make_optimizer(run_options.optimizer_options(config), 10_000, abstract_params)
    compiled = pretrain.compile_pretraining(config, model_cfg, optimizer, schedule)
    state = train_lib.place_state(pretrain.initial_params(model_cfg, 0), optimizer, compiled)
    tokens = np.random.default_rng(0).integers(0, 40478, (args.batch, model_cfg.n_ctx + 1)).astype(np.int32)
    batch = sharding.global_batch(tokens, compiled.mesh)
    start = time.perf_counter()
    state, metrics = compiled.train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = compiled.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    if args.profile:
        profile = pathlib.Path(args.profile)
        with jax.profiler.trace(str(profile)):
            for _ in range(3):
                state, metrics = compiled.train_step(state, batch)
            jax.block_until_ready(metrics)
        # The trace names XLA's fusions; the optimized program says which operations each one holds.
        (profile / "train_step.hlo.txt").write_text(compiled.train_step.lower(state, batch).compile().as_text())
    flops = pretrain.train_flops_per_token(model_cfg, model_cfg.n_ctx) * args.batch * model_cfg.n_ctx
    return {"framework": "gpt1_jax", "device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "dtype": args.dtype, "batch": args.batch, "n_ctx": model_cfg.n_ctx, "step_s": step_s,
            "tokens_per_s": args.batch * model_cfg.n_ctx / step_s, "compile_s": compile_s,
            "mfu": flops / step_s / pretrain.peak_flops(config)}


def torch_step(args) -> dict | None:
    try:
        import torch
        from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = dict(n_positions=64, n_embd=64, n_layer=2, n_head=2) if args.tiny else {}
    model = OpenAIGPTLMHeadModel(OpenAIGPTConfig(**sizes)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2.5e-4, weight_decay=0.01, fused=device == "cuda")
    n_ctx = model.config.n_positions
    tokens = torch.randint(0, 40478, (args.batch, n_ctx + 1), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
            loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss  # transformers shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"framework": "transformers", "device": device, "dtype": args.dtype, "batch": args.batch,
            "n_ctx": n_ctx, "step_s": step_s, "tokens_per_s": args.batch * n_ctx / step_s}


def sweep(args) -> None:
    """Every variant in a fresh process, then transformers here; a markdown table at the end."""
    rows = []
    for name in args.variants:
        variant_flags, xla_flags = VARIANTS[name]
        command = [sys.executable, __file__, "--no_torch", f"--batch={args.batch}", f"--steps={args.steps}",
                   f"--dtype={args.dtype}", f"--peak_flops={args.peak_flops}", *(["--tiny"] * args.tiny),
                   *variant_flags]
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()}
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
            continue
        rows.append({"variant": name, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    reference = None if args.no_torch else torch_step(args)
    if reference:
        print(json.dumps(reference), flush=True)
    first = rows[0]["tokens_per_s"] if rows else 0.0
    print("\n| variant | tokens/s | MFU | step ms | compile s | against the first | against transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        versus = f"{row['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference else "-"
        print(f"| {row['variant']} | {row['tokens_per_s']:,.0f} | {row['mfu']:.1%} | {row['step_s'] * 1e3:.1f} | "
              f"{row['compile_s']:.0f} | {row['tokens_per_s'] / first:.2f}x | {versus} |")


def _define_flags(flag_values: flags.FlagValues) -> None:
    define = dict(flag_values=flag_values)
    flags.DEFINE_integer("batch", 64, "Sequences per step.", **define)
    flags.DEFINE_integer("steps", 10, "Timed steps after the compiling one.", **define)
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "model.dtype: the compute dtype.", **define)
    flags.DEFINE_integer("loss_chunk", 8192, "train.loss_chunk: positions per chunk of the LM loss (0: one).",
                         **define)
    flags.DEFINE_string("remat", "none", "model.remat.", **define)
    flags.DEFINE_float("peak_flops", 0.0, "Per device; 0 looks the device up.", **define)
    flags.DEFINE_boolean("tiny", False, "A 2 x 64 model at ctx 64, for a smoke run.", **define)
    flags.DEFINE_boolean("no_torch", False, "Skip the transformers reference.", **define)
    flags.DEFINE_enum("layers", "auto", ["auto", "scan", "unrolled"],
                      "model.layers: one lax.scan, the blocks one after another, or auto (unrolled on TPU).", **define)
    flags.DEFINE_enum("attention", "auto", ["auto", "faithful", "fused", "fast"],
                      "model.attention: fused runs the Pallas kernels (TPU, GPU); auto picks them on a TPU.", **define)
    flags.DEFINE_enum("head_backward", "compute", ["compute", "float32"],
                      "model.head_backward: the tied head's backward products in the compute dtype or float32.",
                      **define)
    flags.DEFINE_boolean("sweep", False, "Run --variants side by side (see VARIANTS).", **define)
    cli.define_choices("variants", VARIANTS, VARIANTS, "For --sweep.", flag_values)
    flags.DEFINE_string("profile", None, "After timing, trace 3 more of our steps into this folder, with the "
                        "optimized program (benchmarks/profile_breakdown.py groups its kernels; xprof reads it too).",
                        **define)


def main(argv: list[str] | None = None) -> None:
    command_line = cli.parse(argv, _define_flags, prog="python benchmarks/accelerator_step.py",
                             synopsis="[--tiny] [--sweep] [--batch N] [--steps N] ...", doc=__doc__)
    args = command_line.flags
    if args.sweep:
        return sweep(args)
    ours = jax_step(args)
    print(json.dumps(ours))
    reference = None if args.no_torch else torch_step(args)
    if reference:
        print(json.dumps(reference))
        print(json.dumps({"ours_over_transformers": ours["tokens_per_s"] / reference["tokens_per_s"]}))


if __name__ == "__main__":
    main()
