"""The paper's pre-training config compiled for common TPU slices: the README's "Before you create the slice" table.

For each slice, the train and evaluation steps of gpt1_jax/configs/gpt1_pretrain.py in bfloat16 (batch 64 x 512)
are compiled twice with `gpt1_jax.aot.compile_for_topology`, the core of `gpt1-compile`: pure data
parallelism (mesh.fsdp=1) and fully sharded (mesh.fsdp = the chip count). It records the train step's
memory per chip against the HBM a program may use, FITS, the collectives, and how long each compile took
on this machine, then writes the section of docs/benchmarks.md unless --no_doc.

    python benchmarks/tpu_slices.py [--slices v5e-4,v4-16] [--no_doc]
    python benchmarks/tpu_slices.py --tiny --slices v5e-4 --no_doc   # a smoke run: seconds, not minutes
"""

from __future__ import annotations

import importlib.metadata
import sys
import time

import jax
from absl import flags
from doc_section import define_doc_flags, publish

from gpt1_jax import cli
from gpt1_jax.aot import slices, steps
from gpt1_jax.configs import gpt1_pretrain, tiny_pretrain

HEADING = "## Compiled for TPU slices (CPU, libtpu)"
# gcloud's names; v4-16 is the two-host slice (8 chips, 2 hosts of 4).
SLICES = ("v4-8", "v5e-4", "v5e-16", "v5p-8", "v6e-4", "v4-16")


def _define_flags(flag_values: flags.FlagValues) -> None:
    define_doc_flags(flag_values, tiny_help="Compile gpt1_jax/configs/tiny_pretrain.py's 2 x 64 model instead of the "
                     "paper's, to check that the script runs (with --no_doc: its numbers are not the table's).")
    flags.DEFINE_list("slices", list(SLICES), "The slices to compile for.", flag_values=flag_values)


def slice_config(fsdp: int, tiny: bool):
    """The paper's pre-training in bfloat16 with `fsdp` chips to a group, or the tiny recipe's model for a smoke run."""
    config = (tiny_pretrain if tiny else gpt1_pretrain).get_config()
    config.model.dtype = "bfloat16"
    config.mesh.fsdp = fsdp
    return config


def row(name: str, fsdp: int, tiny: bool) -> tuple[str, float]:
    start = time.perf_counter()
    report = steps.compile_for_topology(slice_config(fsdp, tiny), name)
    seconds = time.perf_counter() - start
    train = report.steps[0]
    tpu, memory = report.slice, train.memory
    collectives = ", ".join(f"{kind} x{s.count}" for kind, s in train.collectives.items()) or "none"
    state = (memory.parameters + memory.optimizer_state) / slices.GiB
    line = (f"| {name} ({tpu.topology}) | {tpu.chips} / {tpu.hosts} | {report.mesh['data']} | {report.mesh['fsdp']} | "
            f"{state:.2f} | {memory.temporaries / slices.GiB:.2f} | "
            f"**{memory.total / slices.GiB:.2f}** of {tpu.hbm_bytes / slices.GiB:.2f} | "
            f"{'yes' if report.fits else '**no**'} | {collectives} | "
            f"{' + '.join(f'{step.compile_seconds:.0f}' for step in report.steps)} |")
    return line, seconds


def main(argv: list[str] | None = None) -> None:
    command_line = cli.parse(argv, _define_flags, prog="python benchmarks/tpu_slices.py",
                             synopsis="[--slices A,B] [--tiny] [--no_doc]", doc=__doc__)
    args = command_line.flags
    jax.config.update("jax_platforms", "cpu")  # this machine only compiles: the slices are libtpu's description
    lines, total = [], 0.0
    for name in args.slices:
        chips = slices.resolve(name).chips
        for fsdp in sorted({1, chips}):
            line, seconds = row(name, fsdp, args.tiny)
            print(line, flush=True, file=sys.stderr)
            lines.append(line)
            total += seconds
    text = "\n".join([
        HEADING,
        f"{time.strftime('%Y-%m-%d')}, `python benchmarks/tpu_slices.py` on this 2-core machine (jax "
        f"{jax.__version__}, libtpu {importlib.metadata.version('libtpu')}): "
        "gpt1_jax/configs/gpt1_pretrain.py with `--config.model.dtype=bfloat16` (the paper's 12 x 768 model, "
        "batch 64 x 512, "
        "dropout 0.1, the released code's Adam in float32) compiled by `gpt1_jax.aot.compile_for_topology`, the "
        "core of `gpt1-compile`. Memory is the train step's, per chip, in GiB; HBM is what libtpu lets a program "
        "use. Collectives are per step (one in a loop counts once per iteration). Compile seconds: train step + "
        "evaluation step, each for one slice on this machine.",
        "",
        "| slice | chips / hosts | data-parallel | fsdp | params + Adam | temporaries | per chip (of HBM) | fits | "
        "collectives | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
        *lines,
        "",
        f"{len(lines)} configs in {total / 60:.1f} minutes.",
        "",
    ])
    publish(HEADING, text, write=not args.no_doc)


if __name__ == "__main__":
    main()
