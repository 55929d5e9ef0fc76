"""TPU slices by name, described by libtpu without a TPU, and the slice a run is attached to.

`jax.experimental.topologies.get_topology_desc` gives the devices of any slice on a machine without
one, given libtpu (`pip install 'jax[tpu]'`); a program compiled for them (`jit(...).lower().compile()`)
is the program the slice would run. Names come in two spellings:
- libtpu's, `GENERATION:AxB` or `GENERATION:AxBxC`: chips per axis (`v5e:2x2`, `v4:2x2x2`);
- gcloud's accelerator types (`--accelerator-type` of `gcloud compute tpus tpu-vm create`): `v5litepod-16`
  and `v6e-4` count chips, `v4-8` and `v5p-8` count TensorCores, two per chip. They map to the slice
  shapes Cloud TPU creates for them (`DEFAULT_SHAPES`).
One device is one chip throughout: v4 and v5p run their two TensorCores as one device ("megacore"),
as JAX on those VMs does. Hosts are libtpu's: 4 chips each (a 2x2 board), except single-host v5e and
v6e slices of 1 and 8 chips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import math
import os
import re
import tempfile
from typing import Iterator, Sequence

import jax

from gpt1_jax.errors import UserError

log = logging.getLogger(__name__)

GiB = 1 << 30


class TopologyError(UserError, ValueError):
    """A slice name that names no TPU slice, or a libtpu that cannot describe one."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """What a TPU generation's chips are.

    `hbm_bytes` is the HBM a program may use per chip, the figure the compiler checks against: the chip's
    HBM less what the runtime reserves (16 GiB less 0.25 on a v5e). Read from libtpu (its out-of-memory
    error names it; tests/aot/test_slices.py checks these against it); the bf16 peaks are Cloud TPU's.
    """

    name: str  # as in libtpu's topology names: v4, v5e, v5p, v6e
    device_kinds: tuple[str, ...]  # `jax.Device.device_kind` of its chips: libtpu's first, then the MFU table's
    axes: int  # 2: a 2-D torus of chips (v5e, v6e); 3: a 3-D one (v4, v5p)
    hbm_bytes: int
    peak_bf16_flops: float
    cores_per_chip: int  # gcloud's v4-N and v5p-N count cores (N / 2 chips); v5litepod-N and v6e-N count chips


GENERATIONS = {g.name: g for g in (
    Generation("v4", ("TPU v4",), 3, int(30.75 * GiB), 275e12, 2),
    Generation("v5e", ("TPU v5 lite", "TPU v5e"), 2, int(15.75 * GiB), 197e12, 1),
    Generation("v5p", ("TPU v5", "TPU v5p"), 3, int(95.74 * GiB), 459e12, 2),
    Generation("v6e", ("TPU v6 lite", "TPU v6e"), 2, int(31.25 * GiB), 918e12, 1),
)}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}  # gcloud's v5litepod-16 is libtpu's v5e:4x4
# The slice shape Cloud TPU creates for a chip count, per torus rank.
DEFAULT_SHAPES = {
    2: {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
    3: {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8),
        512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)},
}
ACCEPTED = ("v4:2x2x1, v5e:4x4, v5p:2x2x1, v6e:2x2 (GENERATION:chips per axis), or gcloud's accelerator types "
            "v4-8, v5litepod-16 (also v5e-16), v5p-8, v6e-4")


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A slice's chips, one `jax.Device` each (compile-only unless attached), and what each chip holds."""

    name: str  # as the user wrote it
    topology: str  # libtpu's spelling, e.g. v5e:4x4
    generation: Generation
    devices: tuple
    hbm_bytes: int  # per chip, for programs: the generation's, or what the runtime reports on an attached slice

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def hosts(self) -> int:
        return len({device.process_index for device in self.devices})

    @property
    def chip_kind(self) -> str:
        return self.devices[0].device_kind

    def describe(self) -> str:
        alias = "" if self.name == self.topology else f" ({self.name})"
        chips, hosts = self.chips, self.hosts
        return (f"{self.topology}{alias}: {chips} chip{'s' * (chips > 1)} of {self.chip_kind}, {hosts} "
                f"host{'s' * (hosts > 1)}, {self.hbm_bytes / GiB:.2f} GiB of HBM per chip for programs")


def parse(name: str) -> tuple[Generation, tuple[int, ...]]:
    """(generation, chips per axis) of a slice name in either spelling, or a TopologyError listing both."""
    match = re.fullmatch(r"\s*([a-z0-9]+)(?::(\d+(?:x\d+)*)|-(\d+))\s*", name.lower())
    generation = match and GENERATIONS.get(ALIASES.get(match[1], match[1]))
    if not generation:
        raise TopologyError(f"--topology {name!r} is not a TPU slice name. Accepted: {ACCEPTED}.")
    example = f"{generation.name}:{'x'.join(['2'] * generation.axes)}"
    if match[2]:
        shape = tuple(int(n) for n in match[2].split("x"))
        if len(shape) != generation.axes or min(shape) < 1:
            raise TopologyError(f"--topology {name!r}: a {generation.name} slice has {generation.axes} axes of "
                                f"chips, e.g. {example}. Accepted: {ACCEPTED}.")
        return generation, shape
    chips, odd = divmod(int(match[3]), generation.cores_per_chip)
    shapes = DEFAULT_SHAPES[generation.axes]
    if odd or chips not in shapes:
        sizes = ", ".join(f"{match[1]}-{n * generation.cores_per_chip}" for n in shapes)
        raise TopologyError(f"--topology {name!r}: Cloud TPU has no such {generation.name} slice; its sizes are "
                            f"{sizes}. Or give the shape, e.g. {example}.")
    return generation, shapes[chips]


def _host_bounds(generation: Generation, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Chips per host along each axis: a 2x2 board, except v5e/v6e slices of 1 and 8 chips (one host each)."""
    if generation.axes == 2 and math.prod(shape) in (1, 8):
        return (*shape, 1)
    return 2, 2, 1


def resolve(name: str) -> TpuSlice:
    """The slice `name` as libtpu describes it: its devices and HBM, with no TPU attached."""
    generation, shape = parse(name)
    check_libtpu()
    topology = f"{generation.name}:{'x'.join(map(str, shape))}"
    options = {"chips_per_host_bounds": _host_bounds(generation, shape)}
    if generation.cores_per_chip > 1:
        options["chip_config_name"] = "megacore"  # one device per chip, as on the VMs
    from jax.experimental import topologies

    # libtpu lets one process at a time load it (a lock file in /tmp) unless told otherwise. Describing a slice
    # opens no chip, so a second compile may run beside the first, or beside the training that holds a VM's TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _libtpu_chatter_to_log():
        try:
            devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **options).devices
        except jax.errors.JaxRuntimeError as err:
            reason = str(err).splitlines()[0].rstrip(".")
            names = f" Accepted: {ACCEPTED}." if "INVALID_ARGUMENT" in reason else ""
            raise TopologyError(f"--topology {name!r} ({topology}): libtpu cannot describe it: {reason}.{names}"
                                ) from None
    return TpuSlice(name, topology, generation, tuple(devices), generation.hbm_bytes)


def attached(devices: Sequence[jax.Device] | None = None) -> TpuSlice | None:
    """The TPU slice this process runs on (every process's chips), None off a TPU; its HBM per chip as the
    runtime reports it (`bytes_limit`)."""
    devices = tuple(jax.devices() if devices is None else devices)
    if devices[0].platform != "tpu":
        return None
    generation = next((g for g in GENERATIONS.values() if devices[0].device_kind in g.device_kinds), None)
    if generation is None:
        log.warning("Unknown TPU kind %r: its memory is not checked before training.", devices[0].device_kind)
        return None
    hbm = _bytes_limit(devices) or generation.hbm_bytes
    extent = [max(getattr(d, "coords", (0, 0, 0))[axis] for d in devices) + 1 for axis in range(generation.axes)]
    topology = f"{generation.name}:{'x'.join(map(str, extent))}"
    return TpuSlice(topology, topology, generation, devices, hbm)


def _bytes_limit(devices: tuple) -> int | None:
    """What the runtime lets programs use on one of this process's chips; None where it cannot say."""
    local = [device for device in devices if device.process_index == jax.process_index()]
    try:
        return (local[0].memory_stats() or {}).get("bytes_limit") if local else None
    except jax.errors.JaxRuntimeError:  # a chip described for compiling only
        return None


def check_libtpu() -> None:
    """libtpu is importable and is the release this jax was built against (jax's `tpu` extra pins it)."""
    fix = f"pip install 'jax[tpu]=={jax.__version__}' (or pip install -e '.[tpu]' in a clone of gpt1-jax)"
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise TopologyError(f"libtpu is not installed; compiling for a TPU needs it: {fix}.") from None
    required = required_libtpu()
    installed = importlib.metadata.version("libtpu")
    if required and not _satisfies(installed, required):
        raise TopologyError(f"libtpu {installed} does not match jax {jax.__version__}, which needs libtpu{required}: "
                            f"{fix}.")


def required_libtpu() -> str | None:
    """jax's pin of libtpu for its `tpu` extra (e.g. "==0.0.42.*"), None when its metadata has none."""
    for requirement in importlib.metadata.requires("jax") or ():
        match = re.match(r"libtpu\s*(==\s*[0-9A-Za-z.*]+)\s*;.*extra\s*==\s*['\"]tpu['\"]", requirement)
        if match:
            return match[1].replace(" ", "")
    return None


def _satisfies(version: str, pin: str) -> bool:
    """Whether `version` meets an `==X` or `==X.*` pin (the two forms jax's metadata uses)."""
    wanted = pin.removeprefix("==")
    if wanted.endswith(".*"):
        return version == wanted[:-2] or version.startswith(wanted[:-1])
    return version == wanted


@contextlib.contextmanager
def _libtpu_chatter_to_log() -> Iterator[None]:
    """Sends what libtpu prints to stderr while it loads to the debug log.

    Off a TPU VM it cannot find the VM's accelerator type and worker hostnames and says so, as C++
    log lines on file descriptor 2, which Python's `sys.stderr` does not own; nothing is wrong.
    """
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            chatter = sink.read().decode(errors="replace").strip()
            if chatter:
                log.debug("libtpu: %s", chatter)
