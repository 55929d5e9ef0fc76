"""Fine-tuning (Sec. 3.2-3.3): the starting points, bad input, the loop's outputs and the central result."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt1_jax.config_check import ConfigError
from gpt1_jax.configs import finetune as finetune_recipe
from gpt1_jax.constants import SHAPE_KEYS
from gpt1_jax.finetuning import finetune, finetune_results, finetune_start, task_inputs, tasks
from gpt1_jax.training import checkpoint
from gpt1_jax.training.preemption import Interrupted
from gpt1_jax.training.run_log import read_metrics
from gpt1_jax.weights import weight_formats
from pretrain_helpers import RECIPES, REPO, losses, wait_for_step


@pytest.fixture(scope="module")
def pretrained(tiny_pretraining) -> pathlib.Path:
    """The `checkpoints` folder of the tiny model pre-trained for 300 steps on the shared books."""
    return tiny_pretraining / "checkpoints"


def tiny_config(init="", **finetune):
    config = finetune_recipe.get_config("tiny")
    config.init = str(init)
    config.data.task_source = "local"
    config.checkpoint.async_save = False
    config.finetune.update(finetune)
    return config


# ---------------------------------------------------------------- starting points


@pytest.mark.slow
def test_orbax_checkpoint_restores_the_backbone(pretrained):
    cfg, params, _ = checkpoint.load_pretrained(pretrained)
    model_cfg, ft_params, description = finetune_start.build_params(tiny_config(pretrained), tasks.get_task("sst2"), 0)
    assert model_cfg.n_special == 3 and "pre-trained" in description
    backbone = ft_params["backbone"]
    for got, want in zip(jax.tree.leaves(backbone["blocks"]), jax.tree.leaves(params["blocks"])):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(backbone["tokens_embed"][:cfg.vocab_size], params["tokens_embed"][:cfg.vocab_size])
    assert ft_params["head"]["dense"]["kernel"].shape == (cfg.width, 2)


@pytest.mark.slow
def test_transfer_one_layer_keeps_only_layer_zero(pretrained):
    """Sec. 5 (Figure 2 left): embeddings + the first k layers pre-trained, the rest fresh."""
    _, params, _ = checkpoint.load_pretrained(pretrained)
    _, ft_params, _ = finetune_start.build_params(tiny_config(pretrained, transfer_layers=1), tasks.get_task("sst2"), 0)
    got, want = ft_params["backbone"]["blocks"]["attn"]["qkv"]["kernel"], params["blocks"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(got[0], want[0])
    assert not np.allclose(got[1], want[1])
    np.testing.assert_array_equal(ft_params["backbone"]["positions_embed"], params["positions_embed"])


def test_hf_folder_is_a_starting_point(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(
        vocab_size=40478, n_positions=32, n_embd=32, n_layer=2, n_head=2))
    hf.save_pretrained(tmp_path / "hf")
    _, expected = weight_formats.load_hf(tmp_path / "hf")
    config = tiny_config(f"hf:{tmp_path / 'hf'}")
    for key in SHAPE_KEYS:
        config.model[key] = 0  # take every size from the folder
    model_cfg, ft_params, _ = finetune_start.build_params(config, tasks.get_task("rte"), 0)
    assert (model_cfg.width, model_cfg.n_layer, model_cfg.n_ctx) == (32, 2, 32)
    np.testing.assert_array_equal(ft_params["backbone"]["blocks"]["mlp"]["fc"]["kernel"],
                                  expected["blocks"]["mlp"]["fc"]["kernel"])


def test_scratch_uses_config_model_sizes():
    model_cfg, ft_params, description = finetune_start.build_params(tiny_config(""), tasks.get_task("sst2"), 0)
    assert (model_cfg.width, model_cfg.n_layer, model_cfg.n_special) == (64, 2, 3)
    assert "scratch" in description and set(ft_params) == {"backbone", "head"}


# ---------------------------------------------------------------- bad input


def test_unknown_task_is_a_clear_error():
    config = tiny_config("")
    config.task = "sst3"
    with pytest.raises(ConfigError, match="task='sst3'.*known tasks.*sst2"):
        finetune.check_config(config)


@pytest.mark.slow
def test_checkpoint_of_another_width_is_a_clear_error(pretrained):
    config = tiny_config(pretrained)
    config.model.width = 128
    with pytest.raises(ConfigError, match="model.width=128.*width=64"):
        finetune_start.build_params(config, tasks.get_task("sst2"), 0)


def test_an_epoch_drops_its_last_partial_batch():
    """train.py: iter_data(..., truncate=True) and n_updates_total = (n_train // n_batch) * n_iter."""
    config = tiny_config("")
    config.train.batch_size = 16
    assert finetune.steps_per_epoch(47, config) == 2
    with pytest.raises(ConfigError, match="train.batch_size=16 exceeds the 9 training examples"):
        finetune.steps_per_epoch(9, config)


def test_the_lm_gather_has_room_for_every_real_target_of_the_runs_batches(data_root, monkeypatch):
    """The compiled step scores `needed_lm_target_slots` positions per device share of a (micro-)batch: it must
    be at least the real targets of every share the run will feed (checked here by building the run's batches
    on SST-2's real sentences, without and with gradient accumulation), and far fewer than the padded
    positions, or the gather saves nothing."""
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    config = finetune_recipe.get_config("mini")
    data = finetune.task_data(config, tasks.get_task(config.task), 128)
    for accum in (1, 2):
        config.train.grad_accum_steps = accum
        slots = finetune.needed_lm_target_slots(data.train, config)
        shards = finetune.lm_target_shards(config)
        most = 0
        for epoch in range(config.finetune.epochs):
            for batch in task_inputs.batches(data.train, config.train.batch_size, shuffle=True, drop_remainder=True,
                                             seed=finetune.epoch_seed(config.seed, epoch)):
                targets = batch["mask"][:, :, 1:].sum(axis=(1, 2))  # [batch]
                for micro in range(accum):
                    most = max(most, targets[micro::accum].reshape(shards, -1).sum(1).max())
        positions = config.train.batch_size // accum // shards * (data.seq_len - 1)
        assert most <= slots < most + 64, accum
        assert slots < positions / 2, (accum, slots, positions)  # SST-2's sentences fill under a third of the rows
    config.finetune.lm_coef = 0.0
    assert finetune.needed_lm_target_slots(data.train, config) == 0  # no L1, nothing to gather


def test_bad_eval_at_and_lm_softmax_rows_are_config_errors():
    config = tiny_config("")
    config.finetune.eval_at = "1000,2k"
    with pytest.raises(ConfigError, match="finetune.eval_at='1000,2k'"):
        finetune.check_config(config)
    config = tiny_config("")
    config.finetune.lm_softmax_rows = "positions"
    with pytest.raises(ConfigError, match="finetune.lm_softmax_rows='positions'.*'all'.*'tokens'"):
        finetune.check_config(config)


# ---------------------------------------------------------------- the loop and its outputs


@pytest.mark.slow
def test_resumed_run_writes_results_and_glue_predictions(pretrained, tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    config = tiny_config(pretrained, max_train_examples=64)
    config.train.log_every = 1
    config.train.stop_at = 2  # a "preemption" after 2 of 4 steps
    assert finetune.finetune(config, str(tmp_path)) == {"stopped_at": 2}
    config.train.stop_at = 0
    results = finetune.finetune(config, str(tmp_path))
    assert [m["step"] for m in read_metrics(tmp_path) if "loss" in m] == [1, 2, 3, 4]  # resumed after step 2
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == "sst2" and saved["best_step"] == 4 and saved["paper"] == {"validation": 91.3}
    assert 0.0 <= saved["dev"]["validation"]["accuracy"] <= 1.0 and saved == json.loads(json.dumps(results))
    assert "| sst2 | validation | accuracy |" in (tmp_path / "results.md").read_text()
    lines = (tmp_path / "predictions" / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 1821
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    assert checkpoint.latest_step(tmp_path / "best") == 4
    # A best step damaged after the run: the rerun says so instead of crashing on missing parameters.
    data_file = max((p for p in (tmp_path / "best" / "4" / "params").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    data_file.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match=r"The best checkpoint in .*best is unusable"):
        finetune.finetune(config, str(tmp_path))


def scripted_dev_scores(monkeypatch, accuracies: list[float]) -> None:
    """Dev accuracy of the successive evaluations, in order, so which step is best is known in advance."""
    remaining = iter(accuracies)
    monkeypatch.setattr(finetune, "evaluate_splits",
                        lambda *args: {"validation": {"accuracy": next(remaining)}})


def three_epochs_stopped_after_two(workdir: pathlib.Path, keep: int):
    """Scratch, 64 examples (4 updates an epoch), evaluated at updates 4, 8 and 12; paused at 8, best/ deleted."""
    config = tiny_config(max_train_examples=64, epochs=3, eval_at="")
    config.checkpoint.keep = keep
    config.train.stop_at = 8
    assert finetune.finetune(config, str(workdir)) == {"stopped_at": 8}
    assert checkpoint.latest_step(workdir / "best") == 4  # 0.9 at update 4 beats 0.5 at update 8
    shutil.rmtree(workdir / "best")
    config.train.stop_at = 0
    return config


@pytest.mark.slow
def test_a_deleted_best_folder_is_rebuilt_from_checkpoints_on_resume_and_after_the_run(
        tmp_path, data_root, monkeypatch, caplog):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    scripted_dev_scores(monkeypatch, [0.9, 0.5, 0.7])
    config = three_epochs_stopped_after_two(tmp_path, keep=5)
    with caplog.at_level("WARNING"):
        results = finetune.finetune(config, str(tmp_path))
    assert "was missing: rebuilt it from" in caplog.text
    assert results["best_step"] == 4 and results["dev"] == {"validation": {"accuracy": 0.9}}  # not update 12's 0.7
    assert "lost_best" not in results and checkpoint.latest_step(tmp_path / "best") == 4
    # The finished run rerun after best/ is gone again: rebuilt again, its predictions written again.
    shutil.rmtree(tmp_path / "best")
    (tmp_path / "results.json").unlink()
    assert finetune.finetune(config, str(tmp_path))["best_step"] == 4
    assert json.loads((tmp_path / "results.json").read_text())["best_step"] == 4


@pytest.mark.slow
def test_a_best_step_gone_from_both_folders_is_reported_as_lost_never_replaced_silently(
        tmp_path, data_root, monkeypatch, caplog):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    scripted_dev_scores(monkeypatch, [0.9, 0.5, 0.7])
    config = three_epochs_stopped_after_two(tmp_path, keep=1)  # checkpoints/ holds update 8 only
    with caplog.at_level("WARNING"):
        results = finetune.finetune(config, str(tmp_path))
    assert "step 4, the best so far (dev accuracy 0.9000), is no longer in" in caplog.text
    assert results["best_step"] == 12 and results["lost_best"]["step"] == 4  # the best of what is left, said so
    shutil.rmtree(tmp_path / "best")  # update 12 is still in checkpoints/: rebuilt, and the loss still said
    assert finetune.finetune(config, str(tmp_path))["lost_best"]["step"] == 4


@pytest.mark.slow
def test_a_finished_run_whose_best_is_gone_everywhere_says_so_instead_of_predicting(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    scripted_dev_scores(monkeypatch, [0.9, 0.5, 0.7])
    config = tiny_config(max_train_examples=64, epochs=3, eval_at="")
    config.checkpoint.keep = 1
    assert finetune.finetune(config, str(tmp_path))["best_step"] == 4
    shutil.rmtree(tmp_path / "best")  # and checkpoints/ holds update 12 only
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"best holds no best checkpoint.*The best \(step 4\) was lost with it"):
        finetune.finetune(config, str(tmp_path))


def sigterm_in_predictions(monkeypatch, calls_to_stop: set[int]) -> None:
    """A SIGTERM before the second batch of the n-th call of `finetune_results.predict` (dev scores, then the test
    predictions), for each n in `calls_to_stop`, as a preemption notice arriving mid-way would."""
    predict, calls = finetune_results.predict, []

    def signalled(eval_step, params, arrays, batch_size, mesh, check_stop):
        calls.append(len(calls) + 1)
        batches = []

        def check():
            batches.append(1)
            if len(batches) == 2 and calls[-1] in calls_to_stop:
                os.kill(os.getpid(), signal.SIGTERM)  # handled at once by the StopRequest in force
            check_stop()

        return predict(eval_step, params, arrays, batch_size, mesh, check)

    monkeypatch.setattr(finetune_results, "predict", signalled)


@pytest.mark.slow
def test_a_sigterm_during_the_dev_evaluation_or_the_test_predictions_stops_there_and_the_rerun_redoes_it(
        tmp_path, data_root, monkeypatch):
    """Either used to run to its end first (a TPU VM gives 30 s). The dev evaluation ends at its next batch, the
    step is saved without it and the rerun scores it first; the predictions end with `Interrupted` (train.py: one
    line, exit 0) and nothing written. The third start's results are the uninterrupted run's."""
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    config = tiny_config(max_train_examples=64, eval_at="")  # 4 updates, scored once, at the end
    straight = finetune.finetune(config, str(tmp_path / "straight"))
    workdir = tmp_path / "stopped"
    sigterm_in_predictions(monkeypatch, {1, 3})  # 1: the dev scores of step 4, 2: redone, 3: the test predictions
    assert finetune.finetune(config, str(workdir)) == {"stopped_at": 4}
    assert checkpoint.latest_step(workdir / "best") is None
    assert not [m for m in read_metrics(workdir) if "val_metric" in m]
    with pytest.raises(Interrupted, match="SIGTERM while writing the test predictions"):
        finetune.finetune(config, str(workdir))
    assert checkpoint.latest_step(workdir / "best") == 4 and not (workdir / "results.json").exists()
    assert not list(workdir.glob("predictions/*"))
    assert finetune.finetune(config, str(workdir)) == straight
    for name in ("results.json", "predictions/SST-2.tsv"):
        assert (workdir / name).read_text() == (tmp_path / "straight" / name).read_text(), name


def launch_two_process_finetuning(workdir: pathlib.Path, data_root: pathlib.Path) -> list[subprocess.Popen]:
    """gpt1_jax/configs/finetune.py:tiny from scratch, 3 epochs of 20 steps, as 2 processes on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(REPO / "train.py"), "--config", f"{RECIPES / 'finetune.py'}:tiny",
               "--workdir", str(workdir), "--config.init=", "--config.data.task_source=local",
               "--config.finetune.epochs=3", "--config.finetune.eval_at=", "--config.train.log_every=1",
               "--config.checkpoint.async_save=False"]
    procs = []
    for index in range(2):
        env = {**os.environ, "GPT1_JAX_DATA": str(data_root), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
               "GPT1_JAX_NUM_PROCESSES": "2", "GPT1_JAX_PROCESS_ID": str(index)}
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


@pytest.mark.slow
def test_two_process_finetuning_saves_on_a_preemption_notice_and_resumes_bit_for_bit(tmp_path, data_root):
    """A SIGTERM reaches one host of a slice; JAX's coordination service has every process stop at the
    same step (`reached_preemption`), save it together and exit 0, and the rerun continues as if never
    stopped."""
    finish(launch_two_process_finetuning(tmp_path / "straight", data_root))
    preempted = tmp_path / "preempted"
    procs = launch_two_process_finetuning(preempted, data_root)
    wait_for_step(preempted, 3, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    outputs = finish(procs)
    saved = checkpoint.TrainCheckpointer(preempted / "checkpoints", keep=3).steps()
    assert saved and saved[-1] < 60 and not (preempted / "results.json").exists()
    assert f"preemption notice at step {saved[-1]}" in outputs[0]
    finish(launch_two_process_finetuning(preempted, data_root))
    assert losses(preempted) == losses(tmp_path / "straight") and len(losses(preempted)) == 60
    for name in ("results.json", "predictions/SST-2.tsv"):
        got, want = (preempted / name).read_text(), (tmp_path / "straight" / name).read_text()
        assert got.replace(str(preempted), "") == want.replace(str(tmp_path / "straight"), ""), name


# ---------------------------------------------------------------- the central result


@pytest.mark.long
def test_pretraining_beats_scratch_on_story_cloze(pretrained, tmp_path, data_root, monkeypatch):
    """Sec. 5 / Table 5 in miniature: the same fine-tuning from the briefly pre-trained model beats it from scratch.

    Story Cloze, because it is the shared task that this little pre-training can help: the 300-step
    LM alone already picks the right ending of 55% of the 1,871 validation stories zero-shot, where
    SST-2 is at chance. Both runs use the paper's objective L3 = L2 + 0.5 L1 and the same seed, step size and
    3 epochs over the 1,497 training stories; the score is test accuracy at the epoch chosen on the
    374 held-out stories, as results.json reports it. Measured: 57.6% against 51.6% (one standard
    error is ~1.15 points). docs/finetuning.md says what this does and does not show.
    """
    monkeypatch.setenv("GPT1_JAX_DATA", str(data_root))
    accuracy = {}
    for name, init in (("pre-trained", pretrained), ("scratch", "")):
        config = tiny_config(init, max_train_examples=0, epochs=3, lm_coef=0.5)
        config.task = "story_cloze"
        accuracy[name] = finetune.finetune(config, str(tmp_path / name))["dev"]["test"]["accuracy"]
    print(f"\nStory Cloze test accuracy: {accuracy}")
    assert accuracy["pre-trained"] > 0.54, accuracy  # above chance by more than 3 standard errors
    assert accuracy["pre-trained"] > accuracy["scratch"] + 0.04, accuracy
