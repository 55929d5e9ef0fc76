"""What an optimized XLA program holds, read from its text (`jax.stages.Compiled.as_text()`).

Two things that `memory_analysis()` and `cost_analysis()` do not say:
- the bytes of each argument as the compiler laid it out (`entry_argument_bytes`). A TPU stores arrays
  in tiles (`f32[12,768]{1,0:T(8,128)}` pads 12 rows to 16), so parameters, optimizer state and batch
  are told apart by position here, and their sum is exactly `memory_analysis().argument_size_in_bytes`;
- the collectives one step runs (`collectives`): every all-gather, all-reduce, reduce-scatter,
  all-to-all and collective-permute, counted as often as it executes. A collective inside a loop
  body (the layer scan, gradient accumulation, the chunked loss) runs once per iteration; the trip
  count is read from the loop's condition, `counter < N`, the form `lax.scan` lowers to.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter, defaultdict

ELEMENT_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                 "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                 "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_ARRAY = re.compile(r"\b(" + "|".join(ELEMENT_BYTES) + r")\[([\d,]*)\](?:\{([^}]*)\})?")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
# `%name = SHAPE opcode(operands), attributes`; a tuple SHAPE has spaces, so the opcode is the first `word(`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_FUSED_REDUCE_SCATTER = re.compile(r"\bcalls=%all-reduce-scatter")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                      r"\{?(%[\w.\-]+(?:, %[\w.\-]+)*)\}?")


@dataclasses.dataclass(frozen=True)
class CollectiveStats:
    """How often one kind of collective runs in a step, and the bytes of the full arrays it moves."""

    count: int
    bytes: int


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in an HLO shape (a tuple's elements summed), as logical arrays (no padding)."""
    return sum(math.prod(_dims(dims)) * ELEMENT_BYTES[dtype] for dtype, dims, _ in _ARRAY.findall(shape_text))


def laid_out_bytes(dtype: str, dims: str, layout: str) -> int:
    """Bytes of one array as laid out: its minor dimensions padded to the first tile `T(a,b)` of `layout`."""
    shape = _dims(dims)
    order, _, tiling = (layout or "").partition(":")
    physical = [shape[i] for i in reversed(_dims(order))] if order else shape  # major to minor
    tile = re.search(r"T\(([\d,]+)\)", tiling)
    if tile:
        sizes = _dims(tile[1])
        physical = [1] * max(0, len(sizes) - len(physical)) + physical
        head, minor = physical[:len(physical) - len(sizes)], physical[len(physical) - len(sizes):]
        physical = head + [-(-n // t) * t for n, t in zip(minor, sizes)]
    return math.prod(physical) * ELEMENT_BYTES[dtype]


def entry_argument_bytes(hlo_text: str) -> list[int]:
    """Bytes of each argument of the program, in order, as the compiler laid them out (its entry layout)."""
    header = hlo_text.split("\n", 1)[0]
    match = re.search(r"entry_computation_layout=\{\((.*)\)->", header)
    if match is None:
        raise ValueError("not an optimized HLO module: its first line has no entry_computation_layout")
    return [laid_out_bytes(dtype, dims, layout) for dtype, dims, layout in _ARRAY.findall(match[1])]


def collectives(hlo_text: str) -> dict[str, CollectiveStats]:
    """{kind: count and bytes per step} for the kinds of `COLLECTIVES` the program runs.

    Bytes are the full (gathered, or reduced) arrays: an all-gather's output, an all-reduce's or a
    reduce-scatter's input, an all-to-all's or a permute's input. An asynchronous pair (`-start`,
    `-done`) counts once.
    """
    computations, entry = _computations(hlo_text)
    shapes = {name: shape for lines in computations.values() for name, shape, *_ in map(_parse, lines) if name}
    counts, sizes = Counter(), Counter()
    for computation, runs in _executions(computations, entry).items():
        for _, shape, opcode, rest in map(_parse, computations[computation]):
            kind = _collective_kind(opcode, rest)
            if kind is None:
                continue
            operands = sum(array_bytes(shapes.get(op, "")) for op in re.findall(r"%([\w.\-]+)", rest.split(")")[0]))
            result = array_bytes(shape) - (operands if opcode.endswith("-start") else 0)
            counts[kind] += runs
            sizes[kind] += runs * (result if kind == "all-gather" else operands)
    return {kind: CollectiveStats(counts[kind], sizes[kind]) for kind in COLLECTIVES if counts[kind]}


def _collective_kind(opcode: str | None, rest: str) -> str | None:
    """The collective an instruction runs, if any. A TPU writes a reduce-scatter as a fusion that calls
    `%all-reduce-scatter...` (an all-reduce whose result each chip slices): one reduce-scatter."""
    if opcode == "fusion" and _FUSED_REDUCE_SCATTER.search(rest):
        return "reduce-scatter"
    kind = opcode.removesuffix("-start") if opcode else None
    return kind if kind in COLLECTIVES else None


def _dims(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def _parse(line: str) -> tuple[str | None, str, str | None, str]:
    match = _INSTRUCTION.match(line)
    return (match[1], match[2], match[3], match[4]) if match else (None, "", None, "")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    computations, current, entry = {}, None, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header[1], [])
            entry = header[1] if line.startswith("ENTRY") else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return computations, entry


def _executions(computations: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation reachable from `entry` runs in one execution of the program."""
    runs: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int) -> None:
        runs[name] += times
        for line in computations.get(name, ()):
            callees = _CALLEES.findall(line)
            if not callees:
                continue
            trips = _trip_count(line, computations) if " while(" in line else 1
            if _FUSED_REDUCE_SCATTER.search(line):
                continue  # counted as one reduce-scatter, not as the all-reduce inside it
            for group in callees:
                for callee in group.split(", "):
                    visit(callee.lstrip("%"), times * trips)

    visit(entry, 1)
    return dict(runs)


def _trip_count(while_line: str, computations: dict[str, list[str]]) -> int:
    """A while loop's iterations: XLA's `known_trip_count` when given, else N of its condition `i < N`."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if known:
        return int(known[1])
    condition = re.search(r"condition=%([\w.\-]+)", while_line)
    lines = computations.get(condition[1], []) if condition else []
    constants = {int(m[1]) for line in lines for m in [re.search(r"= s32\[\]\S* constant\((\d+)\)", line)] if m}
    return constants.pop() if len(constants) == 1 else 1
