"""Orbax checkpoints on disk: the restore paths log no Orbax metadata warning, incomplete saves are deleted,
damaged steps (truncated, bytes changed, garbage metadata) are set aside, `keep` and asynchronous saves,
`load_pretrained`'s checks and its hand-off of a fine-tuned backbone, and errors that name what to fix.

The end-to-end behaviour (resuming a run, kills at any moment, a full disk) is tested through training in
tests/test_pretrain.py and tests/test_reliability.py; these are the checkpointer's own, in seconds.
"""

import importlib
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from flax import nnx

from gpt1_jax.configs import finetune
from gpt1_jax.finetuning import finetune_start, tasks
from gpt1_jax.model.heads import TaskModel
from gpt1_jax.model.transformer import GPT1, GPT1Config
from gpt1_jax.training import checkpoint
from gpt1_jax.weights import weight_formats

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
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.training.checkpoint"):
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
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"missing: does not exist\. Give a run's checkpoints"):
        checkpoint.load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.load_pretrained(tmp_path / "empty")
    save_steps(tmp_path / "foreign", [1])  # its metadata has no model_config
    with pytest.raises(checkpoint.CheckpointError, match="not a gpt1_jax checkpoint"):
        checkpoint.load_pretrained(tmp_path / "foreign")
    checkpoint.save_pretrained(tmp_path / "damaged", GPT1(SMALL, rngs=nnx.Rngs(0)))
    shutil.rmtree(tmp_path / "damaged" / "0" / "params")
    with pytest.raises(checkpoint.CheckpointError, match=r"step 0 in \S+damaged: its params cannot be read"):
        checkpoint.load_pretrained(tmp_path / "damaged")


def test_close_closes_the_manager_even_when_the_last_save_failed(tmp_path, monkeypatch):
    """close() raised the save's error before closing the manager, leaving Orbax's threads to the exit."""
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=5)
    saver.save(1, *train_trees(1), {"kind": "pretrain"})
    errors, closed = [OSError("disk full")], []
    manager_wait, manager_close = saver._manager.wait_until_finished, saver._manager.close

    def wait_until_finished():  # as Orbax: a failed save raises once, then waiting returns
        if errors:
            raise errors.pop()
        manager_wait()

    monkeypatch.setattr(saver._manager, "wait_until_finished", wait_until_finished)
    monkeypatch.setattr(saver._manager, "close", lambda: closed.append(manager_close()))
    with pytest.raises(checkpoint.CheckpointError, match="Writing checkpoint step 1 to .* failed: disk full"):
        saver.close()
    assert closed == [None]


def test_a_step_folder_that_cannot_be_made_fails_the_save_at_once(tmp_path):
    """Orbax made the step folder in a background thread; when that failed, the threads writing the items
    waited 300 s for it, and the process could not exit. The folder is now made before `save` returns."""
    saver = checkpoint.TrainCheckpointer(tmp_path / "ckpt", keep=5, async_save=True)
    (tmp_path / "ckpt").rmdir()
    (tmp_path / "ckpt").write_text("a file where the checkpoint folder was")  # fails as an unwritable folder does
    start = time.monotonic()
    with pytest.raises(checkpoint.CheckpointError, match="Writing checkpoint step 2 to .* failed"):
        saver.save(2, *train_trees(2), {"kind": "pretrain"})
    saver.close()
    assert time.monotonic() - start < 10


SHARDED_CHECKSUMS = """
import numpy as np, jax
from jax.sharding import NamedSharding, PartitionSpec as P
from gpt1_jax.training import checkpoint
mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
tree = {"a": np.random.default_rng(0).normal(size=(16, 12, 8)).astype(np.float32), "b": np.arange(8, dtype=np.int32)}
specs = {"a": P("fsdp", None, "data"), "b": P(("data", "fsdp"))}
sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}
print(checkpoint.checksums(tree) == checkpoint.checksums(sharded))
"""


def test_checksums_are_the_same_whatever_the_sharding():
    """A step saved on one mesh (8 devices, fsdp) is verified when restored on another (1 device)."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run([sys.executable, "-c", SHARDED_CHECKSUMS], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "True", result.stderr[-3000:]


def random_bits(tree, seed: int) -> dict:
    """`tree`'s shapes filled with random float32 bit patterns: incompressible, so Orbax's zstd stores them raw
    and a flipped byte changes a value instead of breaking the decompression."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.integers(0, 2**32, a.shape, np.uint32).view(np.float32), tree)


def flip_a_byte(params_dir, array) -> None:
    """Flip one byte inside `array`'s stored bytes. The middle of the largest file could fall on a zstd block
    header, which breaks decompression instead of changing a value (CI saw it); the array's own bytes,
    stored raw, never do."""
    middle = np.asarray(array).tobytes()
    middle = middle[len(middle) // 2 - 16:len(middle) // 2 + 16]
    for data_file in (f for f in params_dir.rglob("*") if f.is_file()):
        data = bytearray(data_file.read_bytes())
        at = data.find(middle)
        if at >= 0:
            data[at + 16] ^= 0xFF
            data_file.write_bytes(bytes(data))
            return
    raise AssertionError(f"the array's bytes are in no file under {params_dir}")


def test_flipped_bytes_fail_the_checksum_restore_falls_back_and_load_pretrained_refuses(tmp_path, caplog):
    """Orbax's files carry no checksum: a flipped byte loaded as changed weights, with no error."""
    shapes = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(GPT1(SMALL, rngs=nnx.Rngs(0)), nnx.Param)))
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=5, async_save=False)
    for step in (2, 4):
        saver.save(step, random_bits(shapes, step), {"step": np.int32(step)},
                   {"model_config": SMALL.to_dict(), "kind": "pretrain"})
    saver.close()
    flip_a_byte(tmp_path / "4" / "params", random_bits(shapes, 4)["tokens_embed"])
    with pytest.raises(checkpoint.CheckpointError, match=r"step 4 in .*: params/\S+ does not match the checksum"):
        checkpoint.load_pretrained(tmp_path)
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=5)
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.training.checkpoint"):
        step, params, _ = saver.restore_latest(abstract(random_bits(shapes, 2)), abstract({"step": np.int32(0)}))
    saver.close()
    assert step == 2 and saver.resumed_verified
    jax.tree.map(np.testing.assert_array_equal, params, random_bits(shapes, 2))
    assert "Checkpoint step 4" in caplog.text and "does not match the checksum" in caplog.text
    assert [p.name[:11] for p in tmp_path.glob("4.*")] == ["4.unusable-"]


@pytest.mark.parametrize("content", ["", "{\"kind\": \"pretr", "[1, 2]"])
def test_garbage_metadata_is_set_aside_in_training_and_named_when_loading(tmp_path, caplog, content):
    save_steps(tmp_path / "run", [2, 4])
    (tmp_path / "run" / "4" / "metadata" / "metadata").write_text(content)
    model = GPT1(SMALL, rngs=nnx.Rngs(0))
    checkpoint.save_pretrained(tmp_path / "converted", model)
    metadata_file = tmp_path / "converted" / "0" / "metadata" / "metadata"
    metadata_file.write_text(content)
    for read in (checkpoint.read_metadata, checkpoint.load_pretrained):
        with pytest.raises(checkpoint.CheckpointError, match=f"{metadata_file}.*(unreadable|not the JSON object)"):
            read(tmp_path / "converted")
    saver = checkpoint.TrainCheckpointer(tmp_path / "run", keep=5)
    with caplog.at_level(logging.WARNING, logger="gpt1_jax.training.checkpoint"):
        step, _, _ = saver.restore_latest(*map(abstract, train_trees(4)))
    saver.close()
    assert step == 2 and "Checkpoint step 4" in caplog.text


def test_metadata_that_disagrees_with_the_arrays_is_refused_naming_the_key(tmp_path):
    """A model_config saying 3 layers over arrays of 2 failed inside Flax, naming neither file nor key."""
    two_layers = SMALL.replace(n_layer=2)
    checkpoint.save_pretrained(tmp_path, GPT1(two_layers, rngs=nnx.Rngs(0)),
                               metadata={"model_config": two_layers.replace(n_layer=3).to_dict()})
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"step 0 in \S+: parameter blocks/attn/proj/bias has shape \(2, 16\) in the arrays "
                             r"but \(3, 16\) by the metadata's model_config .*'n_layer': 3"):
        checkpoint.load_pretrained(tmp_path)


def remove_ln_1_bias(params: dict) -> None:
    del params["blocks"]["ln_1"]["bias"]


def add_a_gate(params: dict) -> None:
    params["blocks"]["attn"]["gate"] = np.zeros((SMALL.n_layer, SMALL.width), np.float32)


@pytest.mark.parametrize("edit, difference", [
    pytest.param(remove_ln_1_bias, r"1 parameter missing: 'blocks/ln_1/bias'", id="removed"),
    pytest.param(add_a_gate, r"1 parameter unused \(the model has no place for them\): 'blocks/attn/gate'", id="added"),
])
def test_a_checkpoint_with_a_leaf_removed_or_added_is_refused_naming_it(tmp_path, edit, difference):
    """Every leaf of a step's params must be one of the model its metadata records, and none may lack."""
    params = nnx.to_pure_dict(nnx.state(GPT1(SMALL, rngs=nnx.Rngs(0)), nnx.Param))
    edit(params)
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=1, async_save=False)
    saver.save(3, params, {"step": np.int32(3)}, {"model_config": SMALL.to_dict(), "kind": "pretrain"})
    saver.close()
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 in \S+: its params do not fit the model its "
                                                         rf"metadata's model_config describes \(.*\): {difference}\. "
                                                         r"Use another step"):
        checkpoint.load_pretrained(tmp_path)


def test_a_fine_tuning_checkpoint_gives_its_backbone_where_a_pre_trained_one_is_expected(tmp_path, caplog):
    """Fine-tuning saves a TaskModel, {"backbone", "head"}: generate, convert and fine-tuning's init read the
    backbone, where they failed with `key in pure_dict not available in state: ('backbone', ...)`."""
    backbone_config = SMALL.replace(n_special=3)
    task_model = TaskModel(GPT1(backbone_config, rngs=nnx.Rngs(0)), tasks.CLASSIFICATION, 2, clf_dropout=0.1,
                           rngs=nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(task_model, nnx.Param))
    saver = checkpoint.TrainCheckpointer(tmp_path, keep=1, async_save=False)
    saver.save(7, params, {"step": np.int32(7)}, {"model_config": backbone_config.to_dict(), "kind": "finetune"})
    saver.close()
    with caplog.at_level(logging.INFO, logger="gpt1_jax.training.checkpoint"):
        config, loaded, metadata = checkpoint.load_pretrained(tmp_path)
    assert config == backbone_config and metadata["kind"] == "finetune"
    jax.tree.map(np.testing.assert_array_equal, loaded, params["backbone"])
    assert "fine-tuning checkpoint" in caplog.text and "dropping its task head" in caplog.text
    model = weight_formats.model_from_params(config, loaded)  # what generate and convert build from it
    assert model(np.zeros((1, 4), np.int32)).shape == (1, 4, SMALL.width)


def test_loading_the_read_only_shipped_mini_logs_no_orbax_read_only_warning(caplog):
    """Orbax warned "setting save_interval_steps=0" and "Given directory is read only" for each read-only manager:
    twice each on every command that loaded `mini`. The notice is dropped during the load alone."""
    with caplog.at_level(logging.WARNING):
        checkpoint.load_pretrained("mini")
        checkpoint.read_metadata("mini")
        absl_logging.warning("Given directory is read only=%s", "a folder opened outside a load")
    assert [record.getMessage() for record in caplog.records] == [
        "Given directory is read only=a folder opened outside a load"]


def save_two_steps(directory) -> dict[int, dict]:
    """Steps 1 and 2 of a SMALL model in `directory`, with different parameters; {step: params}."""
    saver = checkpoint.TrainCheckpointer(directory, keep=5, async_save=False)
    saved = {}
    for step in (1, 2):
        saved[step] = nnx.to_pure_dict(nnx.state(GPT1(SMALL, rngs=nnx.Rngs(step)), nnx.Param))
        saver.save(step, saved[step], {"step": np.int32(step)}, {"model_config": SMALL.to_dict(), "step": step})
    saver.close()
    return saved


def test_a_step_folder_loads_that_step_and_a_workdir_names_its_checkpoints_folder(tmp_path):
    """Both said "no complete checkpoint found (config key: init)", printed twice."""
    saved = save_two_steps(tmp_path / "run" / "checkpoints")
    _, params, metadata = checkpoint.load_pretrained(tmp_path / "run" / "checkpoints" / "1")
    jax.tree.map(np.testing.assert_array_equal, params, saved[1])
    assert metadata["step"] == 1 and checkpoint.read_metadata(tmp_path / "run" / "checkpoints" / "1")["step"] == 1
    assert checkpoint.read_model_config(tmp_path / "run" / "checkpoints" / "2") == SMALL
    with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
        checkpoint.load_pretrained(tmp_path / "run")
    assert str(error.value) == f"Checkpoint {tmp_path / 'run'}: is a workdir: give {tmp_path / 'run' / 'checkpoints'}."
    (tmp_path / "run" / "best").mkdir()  # a fine-tuning workdir's best parameters
    with pytest.raises(checkpoint.CheckpointNotFoundError, match=r"is a workdir: give \S+/run/checkpoints \(its latest "
                                                                 r"step\), or \S+/run/best \(its best\)\.$"):
        checkpoint.read_metadata(tmp_path / "run")


@pytest.mark.parametrize("tool, flag", [("generate", "--checkpoint"), ("zeroshot", "--checkpoint"),
                                        ("evaluate", "--checkpoint"), ("convert", "--orbax_in"),
                                        ("finetune", "--config.init")])
def test_checkpoint_errors_name_the_flag_of_the_tool_that_was_used(tmp_path, capsys, tool, flag):
    """`generate --checkpoint <fine-tuned workdir>` named the config key `init`, which generate does not have."""
    save_two_steps(tmp_path / "run" / "checkpoints")
    expected = f"{flag}={tmp_path / 'run'}: is a workdir: give {tmp_path / 'run' / 'checkpoints'}."
    if tool == "finetune":
        config = finetune.get_config("tiny")
        config.init = str(tmp_path / "run")
        for read in (finetune_start.init_model_config, finetune_start.load_init):
            with pytest.raises(checkpoint.CheckpointNotFoundError) as error:
                read(config)
            assert str(error.value) == expected
        return
    argv = {"generate": ["--prompt", "hi"], "zeroshot": ["--task", "sst2"], "evaluate": ["--data", "files:*.txt"],
            "convert": ["--hf_out", str(tmp_path / "out")]}[tool]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"gpt1_jax.{tool}").main([flag, str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("is a workdir") == 1 and "init" not in err
    assert err.strip().splitlines()[-1] == f"error: {expected}"
