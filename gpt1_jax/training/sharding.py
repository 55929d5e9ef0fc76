"""Distribution as configuration: the device mesh, partition rules by parameter name, array placement.

The mesh has two axes over all devices of all processes: `data` (pure data parallelism) and
`fsdp` (data parallelism whose parameters and optimizer state are sharded too). Batches are
split over both axes. Parameters follow `PARTITION_RULES`: the first regular expression that
matches a parameter's path gives its PartitionSpec when `fsdp > 1`; with `fsdp == 1` everything
is replicated. Optimizer-state leaves carry their parameter's path as a suffix, so the same
rules place Adam's moments next to their parameters.
"""

from __future__ import annotations

import logging
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA_AXES = ("data", "fsdp")

# (path regex, spec): stacked block kernels are [n_layer, in, out]; the embedding tables [rows, width].
PARTITION_RULES = (
    (r"tokens_embed$", P("fsdp", None)),
    (r"positions_embed$", P("fsdp", None)),
    (r"blocks/.*/kernel$", P(None, "fsdp", None)),
    (r"head/.*/kernel$", P("fsdp", None)),
    (r".*", P()),
)


def make_mesh(fsdp: int, devices=None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: every device of every process), `fsdp` devices a group."""
    devices = jax.devices() if devices is None else devices
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp groups of {fsdp} devices do not divide the {len(devices)} devices.")
    grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, DATA_AXES)


def path_name(path) -> str:
    """'blocks/attn/qkv/kernel' for a jax tree path: the plain dict keys, attribute names (optax states)
    and list indices joined by '/', the form `PARTITION_RULES` are written against."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    if mesh.shape["fsdp"] == 1:
        return P()
    spec = next(spec for pattern, spec in PARTITION_RULES if re.search(pattern, name))  # the last rule matches all
    if len(spec) != len(shape):
        return P()
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
            log.info("Replicating %s %s: dimension %d is not divisible by %s=%d.", name, shape, dim, axis,
                     mesh.shape[axis])
            return P()
    return spec


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) of parameters or optimizer state."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _spec_for(path_name(path), tuple(np.shape(x)), mesh)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """The leading (example) axis split over every data-parallel device."""
    return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch, mesh: Mesh):
    """Assemble each process's numpy rows into one global array sharded over the data axes."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)), local_batch)


def process_rows(batch: dict) -> dict:
    """This process's rows of a global batch given whole on every process: the share it feeds to
    `global_batch` (rows i * n / count .. (i + 1) * n / count for process i of count)."""
    n, count, index = len(next(iter(batch.values()))), jax.process_count(), jax.process_index()
    return {k: v[index * n // count:(index + 1) * n // count] for k, v in batch.items()}
