"""The paper's train step on one TPU slice, compiled with each way of running the layers and the attention.

What a chip holds for the paper's step (bfloat16, batch 64 x 512, dropout 0.1, remat none) under
`model.layers` scan / unrolled and `model.attention` faithful (softmax and dropout written out in XLA) /
fused (the Pallas kernels), compiled by `gpt1_jax.aot.compile_for_topology` for `--topology` (v5e:2x2 by
default: 16 sequences per chip). Also whether any [sequences per chip, 12, 512, 512] array is left in the
program, and how long the compile took on this machine. Writes its section of docs/benchmarks.md unless --no_doc.

    python benchmarks/tpu_step_memory.py [--topology v5e:2x2] [--variants scan:fused,unrolled:fused] [--no_doc]
    python benchmarks/tpu_step_memory.py --tiny --variants scan:fused --no_doc   # a smoke run: seconds, not minutes
"""

from __future__ import annotations

import time

import jax
from absl import flags
from doc_section import define_doc_flags, publish

from gpt1_jax import cli
from gpt1_jax.aot import slices, steps
from gpt1_jax.configs import gpt1_pretrain, tiny_pretrain

HEADING = "## The TPU step's memory, by lever (CPU, libtpu)"
VARIANTS = ("scan:faithful", "scan:fused", "unrolled:faithful", "unrolled:fused")  # model.layers:model.attention


def _define_flags(flag_values: flags.FlagValues) -> None:
    define_doc_flags(flag_values, tiny_help="Compile gpt1_jax/configs/tiny_pretrain.py's 2 x 64 model instead of the "
                     "paper's, to check that the script runs (with --no_doc: its numbers are not the table's).")
    flags.DEFINE_string("topology", "v5e:2x2", "The slice to compile for.", flag_values=flag_values)
    cli.define_choices("variants", VARIANTS, VARIANTS, "The rows to compile, each model.layers:model.attention.",
                       flag_values)


def main(argv: list[str] | None = None) -> None:
    command_line = cli.parse(argv, _define_flags, prog="python benchmarks/tpu_step_memory.py",
                             synopsis="[--topology T] [--variants L:A,...] [--tiny] [--no_doc]", doc=__doc__)
    args = command_line.flags
    jax.config.update("jax_platforms", "cpu")  # this machine only compiles: the slice is libtpu's description
    tpu = slices.resolve(args.topology)
    rows = []
    for variant in args.variants:
        layers, attention = variant.split(":")
        config = (tiny_pretrain if args.tiny else gpt1_pretrain).get_config()
        config.model.update(dtype="bfloat16", layers=layers, attention=attention)
        start = time.perf_counter()
        (train,) = steps.compile_for_topology(config, tpu, only=("train step",)).steps
        seconds = time.perf_counter() - start
        per_chip = config.train.batch_size // tpu.chips
        model = config.model
        square = f"[{per_chip},{model.n_head},{model.n_ctx},{model.n_ctx}]" in train.hlo
        rows.append(f"| {layers} | {attention} | {train.memory.temporaries / slices.GiB:.2f} | "
                    f"{train.memory.total / slices.GiB:.2f} | {'yes' if square else 'no'} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        HEADING,
        f"{time.strftime('%Y-%m-%d')}, `python benchmarks/tpu_step_memory.py --topology {args.topology}"
        f"{'' if tuple(args.variants) == VARIANTS else ' --variants ' + ','.join(args.variants)}` on this "
        "2-core machine: the paper's train step (bfloat16, batch 64 x 512, dropout 0.1, `model.remat=none`) "
        f"compiled for {tpu.describe()}. GiB per chip; `[B,12,512,512]`: whether an array of the chip's "
        "attention scores, probabilities or dropout mask is left in the program; seconds to compile the train "
        "step here (a TPU VM's host has far more cores).",
        "",
        "| model.layers | model.attention | temporaries | total | [B,12,512,512] | compile s |",
        "|---|---|---:|---:|---|---:|",
        *rows,
        "",
        "The defaults (`auto`) on a TPU are unrolled layers and the fused kernels (`unrolled:fused`).",
        "",
    ])
    publish(HEADING, text, write=not args.no_doc)


if __name__ == "__main__":
    main()
