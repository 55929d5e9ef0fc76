"""Multi-process start-up: when jax.distributed.initialize() is called, and with what (no real cluster).

The real 2-process runs are in tests/test_sharding.py (pre-training) and tests/test_finetune.py.
"""

import inspect
import os
import re

import jax
import pytest

from gpt1_jax.training import distributed

# The variables of every launcher jax detects, and ours: cleared so that each test sets its own world.
LAUNCHER_PREFIXES = ("JAX_COORDINATOR", "GPT1_JAX_NUM_PROCESSES", "GPT1_JAX_PROCESS_ID", "SLURM_", "OMPI_",
                     "TPU_", "MEGASCALE_", "KUBERNETES_", "JOB_COMPLETION_INDEX")
SLURM_TWO_TASKS = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "2",
                   "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.fixture
def initialize_calls(monkeypatch) -> list[dict]:
    """A world with no launcher; jax.distributed.initialize replaced by a recorder of its arguments."""
    for name in list(os.environ):
        if name.startswith(LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    return calls


def test_a_single_process_run_initializes_nothing(initialize_calls):
    distributed.initialize_from_env()
    assert distributed.launcher_process_count() is None and initialize_calls == []


def test_a_launch_by_hand_passes_the_count_and_id_and_leaves_the_address_to_jax(initialize_calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("GPT1_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("GPT1_JAX_PROCESS_ID", "1")
    distributed.initialize_from_env()
    assert initialize_calls == [{"num_processes": 2, "process_id": 1}]
    inspect.signature(jax.distributed.initialize).bind(**initialize_calls[0])  # names jax's API takes


@pytest.mark.parametrize("environment", [
    SLURM_TWO_TASKS,  # srun -n 2
    {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
     "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},  # mpirun -np 2
])
def test_a_launcher_jax_knows_gets_a_call_without_arguments(initialize_calls, monkeypatch, environment):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    distributed.initialize_from_env()
    assert distributed.launcher_process_count() == 2 and initialize_calls == [{}]


def test_a_single_task_slurm_job_is_a_single_process_run(initialize_calls, monkeypatch):
    for name, value in {**SLURM_TWO_TASKS, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(name, value)
    distributed.initialize_from_env()
    assert initialize_calls == []


@pytest.mark.parametrize("environment, missing", [
    ({"GPT1_JAX_NUM_PROCESSES": "2", "GPT1_JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS=None"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "GPT1_JAX_NUM_PROCESSES": "2"}, "GPT1_JAX_PROCESS_ID=None"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "GPT1_JAX_NUM_PROCESSES": "two", "GPT1_JAX_PROCESS_ID": "0"},
     "GPT1_JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"}, "GPT1_JAX_NUM_PROCESSES=N"),
])
def test_an_incomplete_launch_by_hand_names_what_to_set(initialize_calls, monkeypatch, environment, missing):
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.LaunchError, match=re.escape(missing)) as error:
        distributed.initialize_from_env()
    assert "JAX_COORDINATOR_ADDRESS=host:port" in str(error.value) and initialize_calls == []


@pytest.mark.parametrize("processes, index, workdir, warned", [
    (2, 0, "runs/pod", True),  # several hosts would each keep only their own shards
    (2, 1, "runs/pod", False),  # said once, by process 0
    (2, 0, "gs://bucket/pod", False),  # a bucket is shared by construction
    (1, 0, "runs/pod", False),
])
def test_several_processes_on_a_local_workdir_are_told_every_host_must_share_it(monkeypatch, caplog, processes,
                                                                               index, workdir, warned):
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    with caplog.at_level("WARNING", logger=distributed.__name__):
        distributed.warn_if_workdir_not_shared(workdir)
    said = [r.getMessage() for r in caplog.records if "every host must see the same folder" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert "runs/pod" in said[0] and "gs://BUCKET/RUN" in said[0]
