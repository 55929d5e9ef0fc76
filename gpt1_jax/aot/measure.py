"""One step compiled ahead of time and measured: memory per chip, collectives, FLOPs, and whether it fits.

A step is a jitted function and its arguments without values (`jax.ShapeDtypeStruct`s placed on the
mesh), each argument leaf tagged with what it is (parameters, optimizer state, batch). Compiling it
gives the program the chips would run, and `memory_analysis()` what it holds per chip:
arguments + outputs not written over a donated argument + temporaries + the program itself. That
total against the chip's HBM is the verdict. The training loop runs the same measurement on a real
slice before its first step (`check_before_training`) and keeps the executable it compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from collections import Counter
from typing import Any, Callable, Iterator

import jax

from gpt1_jax.aot import hlo_stats, slices
from gpt1_jax.aot.slices import GiB
from gpt1_jax.errors import UserError

log = logging.getLogger(__name__)

PARAMETERS, OPTIMIZER_STATE, BATCH = "parameters", "optimizer_state", "batch"
_SIZE = r"([\d.]+)([KMGT]?)"  # a size in XLA's messages, e.g. 16.58G
_ANALYSIS_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                    "generated_code_size_in_bytes")


class DoesNotFit(UserError, MemoryError):
    """A run whose step needs more memory per chip than the slice's chips have."""


@dataclasses.dataclass(frozen=True)
class Step:
    """A step to compile: `function(*args)`, and for each leaf of `args` its kind (PARAMETERS, ...)."""

    name: str
    function: Callable
    args: tuple
    kinds: tuple  # the same tree as `args`, a kind string per leaf
    model_flops: float  # per chip: the model-FLOPs formula of the step's matmuls


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Bytes per chip of one compiled step. The first three split `memory_analysis()`'s arguments by what they
    hold (each array as the compiler laid it out, tiles padded); the rest are `memory_analysis()`'s own."""

    parameters: int
    optimizer_state: int  # Adam's moments and the step counters
    batch: int
    temporaries: int
    outputs: int  # results not written over a donated argument: metrics, predictions
    program: int  # the generated code

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer_state + self.batch + self.temporaries + self.outputs + self.program


@dataclasses.dataclass(frozen=True)
class StepReport:
    """A compiled step as the slice would run it; FLOPs and memory per chip, collectives per step."""

    name: str
    memory: MemoryUse
    hbm_bytes: int
    collectives: dict[str, hlo_stats.CollectiveStats]
    xla_flops: float  # cost_analysis(): it counts a loop body once (the layer scan, accumulation, loss chunks)
    model_flops: float
    compile_seconds: float
    hlo: str = dataclasses.field(repr=False, compare=False)
    memory_analysis: dict[str, int] = dataclasses.field(default_factory=dict)  # as XLA gave it, bytes per chip
    refused: str = ""  # the compiler's out-of-memory message when it refused the step (then `hlo` is "")

    @property
    def margin(self) -> int:
        """HBM left per chip (negative: missing)."""
        return self.hbm_bytes - self.memory.total

    @property
    def fits(self) -> bool:
        return self.margin >= 0


def compile_step(step: Step, hbm_bytes: int, *,
                 loadable: bool = True) -> tuple[StepReport, jax.stages.Compiled | None]:
    """Compile `step` for the devices its arguments are placed on; its report and the executable.

    A step far over the chip's HBM is refused by the compiler itself (RESOURCE_EXHAUSTED); its report then
    has the compiler's figure for the temporaries, the arguments as their shards' sizes, and no executable.
    `loadable=False` (chips libtpu only describes): JAX's persistent compilation cache, when one is set up,
    is left alone, since it cannot load such a program back (it warns at every read).
    """
    start = time.perf_counter()
    try:
        with contextlib.nullcontext() if loadable else _persistent_cache_off():
            executable = step.function.trace(*step.args).lower().compile()
    except jax.errors.JaxRuntimeError as err:
        refused = _refused_for_memory(step, str(err), hbm_bytes, time.perf_counter() - start)
        if refused is None:
            raise
        return refused, None
    seconds = time.perf_counter() - start
    hlo = executable.as_text()
    stats = executable.memory_analysis()
    sizes, kinds = hlo_stats.entry_argument_bytes(hlo), jax.tree.leaves(step.kinds)
    if len(sizes) != len(kinds) or sum(sizes) != stats.argument_size_in_bytes:
        raise RuntimeError(f"{step.name}: the program's {len(sizes)} arguments ({sum(sizes)} bytes) do not match its "
                           f"{len(kinds)} inputs ({stats.argument_size_in_bytes} bytes in memory_analysis()).")
    by_kind = Counter()
    for kind, size in zip(kinds, sizes):
        by_kind[kind] += size
    memory = MemoryUse(parameters=by_kind[PARAMETERS], optimizer_state=by_kind[OPTIMIZER_STATE], batch=by_kind[BATCH],
                       temporaries=stats.temp_size_in_bytes,
                       outputs=stats.output_size_in_bytes - stats.alias_size_in_bytes,
                       program=stats.generated_code_size_in_bytes)
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # one dict per program in older jax
    analysis = {field: getattr(stats, field) for field in _ANALYSIS_FIELDS}
    report = StepReport(step.name, memory, hbm_bytes, hlo_stats.collectives(hlo), float(cost.get("flops", math.nan)),
                        step.model_flops, seconds, hlo, analysis)
    return report, executable


@contextlib.contextmanager
def _persistent_cache_off() -> Iterator[None]:
    """Nothing compiled inside goes to JAX's persistent cache. Whether the cache is used at all is decided once
    per process, so the threshold each write checks (seconds a compile took) is what can keep a program out."""
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)
    try:
        yield
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)


def _refused_for_memory(step: Step, message: str, hbm_bytes: int, seconds: float) -> StepReport | None:
    """The report of a step the compiler refused for want of HBM, from its message; None for any other error."""
    temporaries = re.search(rf"required for HLO temporaries \({_SIZE}\) exceeds available HBM", message)
    used = re.search(rf"Used {_SIZE} of {_SIZE} hbm", message)
    if not (temporaries or used):
        return None
    by_kind = Counter()
    for kind, arg in zip(jax.tree.leaves(step.kinds), jax.tree.leaves(step.args)):
        by_kind[kind] += math.prod(arg.sharding.shard_shape(arg.shape)) * arg.dtype.itemsize
    arguments = sum(by_kind.values())
    needed = _bytes(*temporaries.groups()) if temporaries else max(_bytes(*used.groups()[:2]) - arguments, 0)
    memory = MemoryUse(parameters=by_kind[PARAMETERS], optimizer_state=by_kind[OPTIMIZER_STATE], batch=by_kind[BATCH],
                       temporaries=needed, outputs=0, program=0)
    return StepReport(step.name, memory, hbm_bytes, {}, math.nan, step.model_flops, seconds, "",
                      refused=" ".join(message.split())[:400])


def _bytes(number: str, unit: str) -> int:
    """XLA's human-readable size ("16.58G": binary units) in bytes."""
    return int(float(number) * 1024 ** " KMGT".index(unit or " "))


def train_step(compiled: Any, model_flops: float = math.nan) -> Step:
    """The loop's train step (a `train_lib.Compiled`) as a Step: everything but the parameters is optimizer state."""
    state, batch = compiled.abstract_state, compiled.abstract_batch
    kinds = jax.tree.map(lambda _: OPTIMIZER_STATE, state).replace(
        params=jax.tree.map(lambda _: PARAMETERS, state.params))
    return Step("train step", compiled.train_step, (state, batch), (kinds, jax.tree.map(lambda _: BATCH, batch)),
                model_flops)


def check_before_training(compiled: Any):
    """On a TPU slice, compile the run's train step, log its memory per chip, and stop the run if it does not fit.

    `compiled` is the loop's `train_lib.Compiled`; it comes back with the step replaced by the executable
    compiled here, so the loop does not compile it again. Off a TPU it comes back as it is.
    """
    tpu = slices.attached(compiled.mesh.devices.flat)
    if tpu is None:
        return compiled
    report, executable = compile_step(train_step(compiled), tpu.hbm_bytes)
    m = report.memory
    summary = (f"{m.total / GiB:.2f} GiB per chip of {tpu.hbm_bytes / GiB:.2f} on {tpu.topology} (parameters "
               f"{m.parameters / GiB:.2f}, optimizer state {m.optimizer_state / GiB:.2f}, batch {m.batch / GiB:.2f}, "
               f"temporaries {m.temporaries / GiB:.2f})")
    if not report.fits:
        raise DoesNotFit(f"The train step needs {summary}: it does not fit, by {-report.margin / GiB:.2f} GiB. Run "
                         f"`python -m gpt1_jax.compile --topology {tpu.topology} --fit` with this command's --config "
                         "flags for the smallest change that fits, each candidate compiled.")
    log.info("Train step compiled in %.0f s: %s; %.2f GiB to spare.", report.compile_seconds, summary,
             report.margin / GiB)
    return dataclasses.replace(compiled, train_step=executable)
