"""Orbax checkpoints on disk: the restore paths log no Orbax metadata warning, incomplete saves are deleted,
damaged steps are set aside, `keep` and asynchronous saves, and errors that name what to fix.

The end-to-end behaviour (resuming a run, kills at any moment, a full disk) is tested through training in
tests/test_pretrain.py and tests/test_reliability.py; these are the checkpointer's own, in seconds.
"""

import logging

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from flax import nnx

from gpt1_jax import checkpoint
from gpt1_jax.model import GPT1, GPT1Config

SMALL = GPT1Config(vocab_size=50, n_ctx=8, width=16, n_head=2, n_layer=1, mlp_width=32, vocab_pad_multiple=1)


def train_trees(step: int) -> tuple[dict, dict]:
    """(params, rest of the training state) whose values identify `step`."""
    return {"w": np.full((2, 3), step, np.float32)}, {"step": np.int32(step)}


def abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=device), tree)


def save_steps(directory, steps, *, keep: int = 5, async_save: bool = False) -> None:
    saver = checkpoint.TrainCheckpointer(directory, keep=keep, async_save=async_save)
    for step in steps:
        saver.save(step, *train_trees(step), {"kind": "pretrain", "step": step})
    saver.close()


def test_restoring_logs_no_orbax_metadata_warning(tmp_path, caplog):
    """Reading `params` as a standalone checkpoint looked for a `_CHECKPOINT_METADATA` that only the step
    folder has, and Orbax warned "Metadata file does not exist" whenever fine-tuning or a test loaded one."""
    model = GPT1(SMALL, rngs=nnx.Rngs(0))
    checkpoint.save_pretrained(tmp_path / "converted", model)
    save_steps(tmp_path / "run", [2])
    with caplog.at_level(logging.WARNING):
        absl_logging.warning("probe: absl warnings reach this capture")
        config, params, metadata = checkpoint.load_pretrained(tmp_path / "converted")
        step, _, rest = checkpoint.TrainCheckpointer(tmp_path / "run", keep=5).restore_latest(*map(abstract,
                                                                                                 train_trees(2)))
        assert checkpoint.read_metadata(tmp_path / "run")["step"] == 2
    messages = [record.getMessage() for record in caplog.records]
    assert any("probe" in m for m in messages)
    assert not [m for m in messages if "Metadata file does not exist" in m]
    assert config == SMALL and metadata["kind"] == "converted" and (step, int(rest["step"])) == (2, 2)
    want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(params))  # on the host, any mesh next
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_incomplete_saves_are_deleted_before_the_next_save(tmp_path):
    """A process killed while writing step 3 (say, its SIGTERM save) leaves `3.orbax-checkpoint-tmp`, up to a
    checkpoint's size; the resumed run saves other steps, so only the cleanup on opening removes it."""
    save_steps(tmp_path, [2])
    partial = tmp_path / "3.orbax-checkpoint-tmp"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "shard").write_bytes(b"\0" * 4096)
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=5, async_save=False)
    assert saver.steps() == [2]  # never listed
    saver.save(4, *train_trees(4), {"kind": "pretrain"})
    saver.close()
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]


def test_a_damaged_latest_step_is_set_aside_and_the_previous_one_restored(tmp_path, caplog):
    save_steps(tmp_path, [2, 4])
    for f in (tmp_path / "4" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=5)
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.checkpoint"):
        step, params, rest = saver.restore_latest(*map(abstract, train_trees(4)))
    saver.close()
    assert (step, int(rest["step"])) == (2, 2)
    np.testing.assert_array_equal(params["w"], train_trees(2)[0]["w"])
    assert "Checkpoint step 4" in caplog.text
    assert saver.steps() == [2] and [p.name[:11] for p in tmp_path.glob("4.*")] == ["4.unusable-"]


def test_keep_bounds_the_steps_and_asynchronous_saves_are_readable_after_wait(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], keep=2, async_save=True)
    assert checkpoint.TrainCheckpointer(tmp_path, keep=2).steps() == [3, 4]
    assert checkpoint.latest_step(tmp_path) == 4
    assert checkpoint.read_metadata(tmp_path)["step"] == 4
    assert checkpoint.read_metadata(tmp_path, 3)["step"] == 3


def test_load_pretrained_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist.*config key: init"):
        checkpoint.load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.load_pretrained(tmp_path / "empty")
    save_steps(tmp_path / "foreign", [1])  # its metadata has no model_config
    with pytest.raises(checkpoint.CheckpointError, match="not a gpt1_jax checkpoint"):
        checkpoint.load_pretrained(tmp_path / "foreign")
