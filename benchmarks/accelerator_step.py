"""GPT-1 pre-training throughput and MFU on the accelerator at hand, against transformers on the same device.

The issue's target: bfloat16 compute (float32 parameters and optimizer state), batch 64 x 512, the full
GPT-1 config, >= 45% MFU on an H100. Ours is the real step (`pretrain.compile_pretraining`, the paper's
optimizer, dropout 0.1); the reference is `OpenAIGPTLMHeadModel` in PyTorch with bfloat16 autocast and
fused AdamW on the same device, when torch sees one.

    python benchmarks/accelerator_step.py [--batch 64] [--steps 10] [--dtype bfloat16] [--loss-chunk 8192] \
        [--remat none] [--layers auto|scan|unrolled] [--attention auto|faithful|fused|fast] \
        [--head-backward compute|float32] [--profile DIR]
    python benchmarks/accelerator_step.py --sweep [--variants NAME,...]   # every lever side by side
    python benchmarks/accelerator_step.py --tiny --batch 4 --steps 2      # a smoke run on any machine

Prints one JSON line per framework (tokens/s, step seconds, compile seconds, MFU where the device's peak is
known: `pretrain.PEAK_FLOPS`, or `--peak-flops` per device). `--sweep` runs each of `VARIANTS` in a process
of its own (an XLA flag is read once, when jax starts), then transformers once, and prints a markdown table:
tokens/s, MFU, each variant against the first (the step before the levers) and against transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# name: (this script's flags, XLA_FLAGS). The first is the step before the levers of docs/benchmarks.md's
# "Train step (accelerator)": the layer scan, softmax and dropout written out in XLA, the head's backward in
# float32. Each lever alone, then all three, then the XLA flags on top of them.
LEVERS = ["--layers", "unrolled", "--attention", "fused", "--head-backward", "compute"]
VARIANTS = {
    "before": (["--layers", "scan", "--attention", "faithful", "--head-backward", "float32"], ""),
    "unrolled": (["--layers", "unrolled", "--attention", "faithful", "--head-backward", "float32"], ""),
    "fused-attention": (["--layers", "scan", "--attention", "fused", "--head-backward", "float32"], ""),
    "bf16-head": (["--layers", "scan", "--attention", "faithful", "--head-backward", "compute"], ""),
    "all": (LEVERS, ""),
    "all-unchunked-loss": ([*LEVERS, "--loss-chunk", "0"], ""),
    "all-latency-hiding": (LEVERS, "--xla_gpu_enable_latency_hiding_scheduler=true"),
    "all-no-triton-gemm": (LEVERS, "--xla_gpu_enable_triton_gemm=false"),
}


def jax_step(args) -> dict:
    import jax
    import numpy as np

    from configs.common import base_config, model_section
    from gpt1_jax import optim, pretrain, sharding, train_lib

    config = base_config()
    config.model = model_section(dtype=args.dtype, remat=args.remat, layers=args.layers, attention=args.attention,
                                 head_backward=args.head_backward,
                                 **(dict(n_ctx=64, width=64, n_head=2, n_layer=2, mlp_width=256) if args.tiny else {}))
    config.train.batch_size = args.batch
    config.train.loss_chunk = args.loss_chunk
    config.train.peak_flops = args.peak_flops
    model_cfg = pretrain.model_config(config)
    schedule = optim.learning_rate_schedule(config.optimizer, 10_000)
    abstract_params = jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0))
    optimizer = optim.make_optimizer(config.optimizer, 10_000, abstract_params)
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
        with jax.profiler.trace(str(args.profile)):
            for _ in range(3):
                state, metrics = compiled.train_step(state, batch)
            jax.block_until_ready(metrics)
        # The trace names XLA's fusions; the optimized program says which operations each one holds.
        (args.profile / "train_step.hlo.txt").write_text(compiled.train_step.lower(state, batch).compile().as_text())
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
        flags, xla_flags = VARIANTS[name]
        command = [sys.executable, __file__, "--no-torch", "--batch", str(args.batch), "--steps", str(args.steps),
                   "--dtype", args.dtype, "--peak-flops", str(args.peak_flops), *(["--tiny"] * args.tiny), *flags]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--loss-chunk", type=int, default=8192)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--peak-flops", type=float, default=0.0, help="per device; 0 looks the device up")
    parser.add_argument("--tiny", action="store_true", help="a 2 x 64 model at ctx 64, for a smoke run")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--layers", default="auto", choices=("auto", "scan", "unrolled"),
                        help="model.layers: one lax.scan, the blocks one after another, or auto (unrolled on TPU)")
    parser.add_argument("--attention", default="auto", choices=("auto", "faithful", "fused", "fast"),
                        help="model.attention: fused runs the Pallas kernels (TPU, GPU); auto picks them on a TPU")
    parser.add_argument("--head-backward", default="compute", choices=("compute", "float32"),
                        help="model.head_backward: the tied head's backward products in the compute dtype or float32")
    parser.add_argument("--sweep", action="store_true", help="run --variants side by side (see VARIANTS)")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=list(VARIANTS),
                        help=f"comma-separated, for --sweep: {', '.join(VARIANTS)}")
    parser.add_argument("--profile", type=pathlib.Path, default=None,
                        help="after timing, trace 3 more of our steps into this folder, with the optimized program "
                             "(benchmarks/profile_breakdown.py groups its kernels; xprof reads it too)")
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {', '.join(unknown)}: use {', '.join(VARIANTS)}")
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
