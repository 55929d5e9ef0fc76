"""Multi-process start-up: `jax.distributed.initialize()` when this process is one of several.

`jax.distributed.initialize()` finds the coordinator, the process count and this process's id by
itself under the launchers it knows (jax/_src/clusters): Cloud TPU pod slices (the GCE metadata
server, or GKE's `TPU_WORKER_HOSTNAMES`), Slurm's `srun`, Open MPI's `mpirun`, and Kubernetes indexed
Jobs (with the `kubernetes` package). It also reads `JAX_COORDINATOR_ADDRESS` (and
`JAX_COORDINATOR_PORT`, `JAX_COORDINATOR_BIND_ADDRESS`, `JAX_LOCAL_DEVICE_IDS`) from the environment.
Under those launchers, starting the same `train.py` command on every host is all it takes: we ask
jax's own launcher detection how many processes were started and call `initialize()` without
arguments when there is more than one.

The one case jax leaves to its caller is a launch by hand (several processes on one machine, or
hosts without a scheduler): it reads no variable for the process count and id. For that case, and
only that one, two variables of ours go with jax's coordinator address on every process:

    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 GPT1_JAX_NUM_PROCESSES=2 GPT1_JAX_PROCESS_ID=0 python train.py ...
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 GPT1_JAX_NUM_PROCESSES=2 GPT1_JAX_PROCESS_ID=1 python train.py ...

(process 0 serves the coordinator at that address). A single-process run sets nothing, and then
nothing is initialized: it neither starts nor waits for a coordination service. A single-task Slurm
job is such a run too; calling `initialize()` there would also restrict it to one local GPU.
"""

from __future__ import annotations

import logging
import os

import jax
from jax._src import clusters  # jax's launcher detectors, which have no public API

from gpt1_jax import storage
from gpt1_jax.errors import UserError

log = logging.getLogger(__name__)

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"  # read by jax.distributed.initialize() itself
NUM_PROCESSES_ENV = "GPT1_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "GPT1_JAX_PROCESS_ID"
MANUAL_LAUNCH = (f"A launch by hand sets {COORDINATOR_ENV}=host:port (process 0's address), "
                 f"{NUM_PROCESSES_ENV}=N and {PROCESS_ID_ENV}=i (0 <= i < N) in every process")


class LaunchError(UserError, ValueError):
    """A multi-process launch whose environment is incomplete."""


def launcher_process_count() -> int | None:
    """How many processes the launcher jax.distributed.initialize() would detect started; None if none.

    The detectors are asked in jax's own order, skipping the opt-in ones (mpi4py) as `initialize()` does
    when it is given no detection method.
    """
    for launcher in clusters.ClusterEnv._cluster_types:
        if not launcher.opt_in_only_method and launcher.is_env_present():
            return launcher.get_process_count()
    return None


def initialize_args() -> dict[str, int] | None:
    """The arguments for jax.distributed.initialize(), or None for a single-process run.

    Raises:
      LaunchError: a launch by hand with one of its three variables missing or not a number.
    """
    coordinator = os.environ.get(COORDINATOR_ENV)
    count, index = os.environ.get(NUM_PROCESSES_ENV), os.environ.get(PROCESS_ID_ENV)
    if count is not None or index is not None:
        if not (coordinator and count and index and count.isdigit() and index.isdigit()):
            raise LaunchError(f"{MANUAL_LAUNCH}; found {COORDINATOR_ENV}={coordinator!r}, "
                              f"{NUM_PROCESSES_ENV}={count!r}, {PROCESS_ID_ENV}={index!r}.")
        return {"num_processes": int(count), "process_id": int(index)}
    launched = launcher_process_count()
    if coordinator and launched is None:
        raise LaunchError(f"{COORDINATOR_ENV} is set but no launcher jax knows (Slurm, Open MPI, TPU pod, "
                          f"Kubernetes) gives the process count and id. {MANUAL_LAUNCH}.")
    if coordinator or (launched or 0) > 1:
        return {}  # jax reads the coordinator, the count and the id itself
    return None


def initialize_from_env() -> None:
    """Joins this process to the others of a multi-process run; does nothing in a single-process one."""
    args = initialize_args()
    if args is not None:
        jax.distributed.initialize(**args)


def warn_if_workdir_not_shared(workdir: str | os.PathLike) -> None:
    """With several processes and a local workdir, say (on process 0) that every host must see the same folder.

    Orbax writes each host's shards of a checkpoint into the one step folder, and process 0 writes the
    metadata and commits the step: on separate disks each host holds a part and no host can restore it.
    The processes of one machine share its disk, but nothing here can tell one machine from several.
    """
    if jax.process_count() > 1 and not storage.is_url(workdir) and jax.process_index() == 0:
        log.warning("%d processes share the local workdir %s: every host must see the same folder (NFS, Filestore, "
                    "a GCS FUSE mount), or each keeps only its own shards of every checkpoint and none can be "
                    "restored. On a pod slice or cluster use a bucket: --workdir gs://BUCKET/RUN.",
                    jax.process_count(), workdir)
