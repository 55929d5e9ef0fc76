"""Where a profiled train step's device time goes, in a few groups a reader can act on.

`accelerator_step.py --profile DIR` leaves a trace (`*.trace.json.gz`: one event per kernel on the device)
and the step's optimized program (`train_step.hlo.txt`: the output shape of every fusion). The kernel names
alone say little ("loop_compare_select_fusion"); their shapes say what they work on, so each kernel is put
in a group by its name (matrix products, copies) or by its output shape (the [batch, heads, ctx, ctx]
attention probabilities, the per-layer stacks a lax.scan over the blocks fills, the vocabulary-wide logits).

    python benchmarks/profile_breakdown.py DIR [--steps 3] [--n_layer 12] [--n_ctx 512]
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

from absl import flags

from gpt1_jax import cli


def fusion_shapes(hlo_text: str) -> dict[str, str]:
    """{instruction name: its output shape} for every instruction of the optimized program."""
    return {match.group(1): match.group(2)
            for match in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ", hlo_text, re.M)}


def shape_of(kernel_name: str, shapes: dict[str, str]) -> str:
    """The output shape of the fusion a kernel runs: traces write "fusion_382" for the program's "fusion.382"."""
    return shapes.get(re.sub(r"_(\d+)$", r".\1", kernel_name), shapes.get(kernel_name, ""))


def device_kernels(trace_path: pathlib.Path) -> list[dict]:
    """The trace's complete events on the first device (pid of '/device:...:0')."""
    events = json.load(gzip.open(trace_path))["traceEvents"]
    devices = [e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
               and e["args"]["name"].startswith("/device:") and e["args"]["name"].endswith(":0")]
    if not devices:
        raise SystemExit(f"{trace_path} has no device timeline (a CPU run's trace has only the host's): profile "
                         "on a GPU or TPU")
    device = devices[0]
    return [e for e in events if e.get("ph") == "X" and e["pid"] == device]


def group(name: str, shape: str, n_layer: int, n_ctx: int) -> str:
    if re.search(r"gemm|nvjet|xmma|cutlass|cublas", name):
        return "matrix products, float32 (TF32)" if "f32f32" in name else "matrix products, bfloat16"
    if name.startswith("memcpy"):
        return "device-to-device copies"
    if re.search(rf"\[{n_layer},\d+,", shape):
        return "filling the lax.scan's per-layer stacks (broadcasts of [n_layer, ...])"
    if re.search(rf"\d+,{n_ctx},{n_ctx}\]|\[\d+,\d+,{n_ctx}\]", shape):
        return f"attention softmax and dropout on [batch, heads, {n_ctx}, {n_ctx}], their row reductions"
    if re.search(r",40\d\d\d\]", shape):
        return "elementwise on the vocabulary-wide logits"
    return "everything else (layer norms, GELU, residual dropout, optimizer update, ...)"


def _define_flags(flag_values: flags.FlagValues) -> None:
    define = dict(flag_values=flag_values)
    flags.DEFINE_integer("steps", 3, "Steps inside the trace.", **define)
    flags.DEFINE_integer("n_layer", 12, "The model's layers: a [n_layer, ...] output is a scan's stack.", **define)
    flags.DEFINE_integer("n_ctx", 512, "The model's context: a [..., n_ctx, n_ctx] output is attention's.", **define)


def main(argv: list[str] | None = None) -> None:
    command_line = cli.parse(argv, _define_flags, prog="python benchmarks/profile_breakdown.py",
                             synopsis="DIR [--steps 3] [--n_layer 12] [--n_ctx 512]", doc=__doc__,
                             positional="DIR (the folder accelerator_step.py --profile wrote)")
    if len(command_line.args) != 1:
        command_line.fail(f"give one DIR, not {len(command_line.args)}")
    args, profile = command_line.flags, pathlib.Path(command_line.args[0])
    shapes = fusion_shapes((profile / "train_step.hlo.txt").read_text())
    kernels = device_kernels(next(profile.rglob("*.trace.json.gz")))
    busy = collections.Counter()
    for kernel in kernels:
        name = kernel["name"]
        busy[group(name, shape_of(name, shapes), args.n_layer, args.n_ctx)] += kernel["dur"]
    total = sum(busy.values())
    span = max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)
    print(f"{len(kernels) // args.steps} kernels a step; the device is busy {100 * total / span:.0f}% of the traced "
          f"{span / 1e3 / args.steps:.1f} ms a step\n")
    print("| group | ms a step | share |\n|---|---:|---:|")
    for name, micros in busy.most_common():
        print(f"| {name} | {micros / 1e3 / args.steps:.1f} | {100 * micros / total:.1f}% |")


if __name__ == "__main__":
    main()
