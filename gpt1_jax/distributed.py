"""Multi-process start-up: `jax.distributed.initialize()` when the environment asks for it.

On a TPU VM pod slice `GPT1_JAX_DISTRIBUTED=1` is enough (JAX discovers the peers itself); on
GPU clusters or localhost set the coordinator explicitly:
  GPT1_JAX_COORDINATOR=host:port GPT1_JAX_NUM_PROCESSES=N GPT1_JAX_PROCESS_ID=i
Single-process runs set nothing.
"""

from __future__ import annotations

import os

import jax

ENV_ENABLE = "GPT1_JAX_DISTRIBUTED"
ENV_COORDINATOR = "GPT1_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "GPT1_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GPT1_JAX_PROCESS_ID"


def initialize_from_env() -> None:
    coordinator = os.environ.get(ENV_COORDINATOR)
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
        )
    elif os.environ.get(ENV_ENABLE) == "1":
        jax.distributed.initialize()
