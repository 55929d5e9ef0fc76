"""train.py on a TPU slice: the train step is compiled and measured before the first step, and a run that does
not fit stops with the compile tool's verdict. The slice is libtpu's description of one, as the training
code would see it on a TPU VM: the recipes' compile functions are given its chips."""

import jax
import pytest

from gpt1_jax import run_options
from gpt1_jax.aot import measure, slices
from gpt1_jax.configs import finetune as finetune_recipe
from gpt1_jax.configs import tiny_pretrain
from gpt1_jax.finetuning import finetune
from gpt1_jax.pretraining import pretrain
from gpt1_jax.pretraining.lm_pipeline import LMData
from gpt1_jax.training import optim
from pretrain_helpers import assert_trees_equal, final_params, losses, tiny_config


def tiny(batch_size: int):
    config = tiny_pretrain.get_config()
    config.train.batch_size = config.train.eval_batch_size = batch_size
    return config


def compile_tiny(config, devices=None):
    model_cfg = pretrain.model_config(config)
    schedule = optim.learning_rate_schedule(run_options.optimizer_options(config), 10)
    abstract_params = jax.eval_shape(lambda: pretrain.initial_params(model_cfg, 0))
    optimizer = optim.make_optimizer(run_options.optimizer_options(config), 10, abstract_params)
    return pretrain.compile_pretraining(config, model_cfg, optimizer, schedule, devices)


def on_slice(monkeypatch, module, function: str, name: str) -> None:
    """`module.function` (a recipe's compile) builds its mesh over the chips of the slice `name`."""
    chips = slices.resolve(name).devices
    original = getattr(module, function)
    monkeypatch.setattr(module, function, lambda *args, **kwargs: original(*args, **kwargs, devices=chips))


@pytest.mark.slow
def test_a_step_that_fits_is_logged_and_handed_to_the_loop_compiled(caplog):
    compiled = compile_tiny(tiny(16), slices.resolve("v5e:1x1").devices)
    with caplog.at_level("INFO", logger="gpt1_jax.aot.measure"):
        checked = measure.check_before_training(compiled)
    assert isinstance(checked.train_step, jax.stages.Compiled)
    assert "GiB per chip of 15.75 on v5e:1x1 (parameters 0.01, optimizer state 0.02" in caplog.text


def test_off_a_tpu_the_step_is_left_as_it_is():
    compiled = compile_tiny(tiny(16))
    assert measure.check_before_training(compiled) is compiled


def test_a_pretraining_that_does_not_fit_stops_before_it_claims_the_workdir_or_reads_data(monkeypatch, tmp_path):
    on_slice(monkeypatch, pretrain, "compile_pretraining", "v5e:1x1")
    monkeypatch.setattr(LMData, "build", lambda config: pytest.fail("read the data"))
    workdir = tmp_path / "run"
    with pytest.raises(measure.DoesNotFit, match=r"The train step needs [\d.]+ GiB per chip of 15.75 on v5e:1x1 .*it "
                                                 r"does not fit, by [\d.]+ GiB. Run `python -m gpt1_jax.compile "
                                                 r"--topology v5e:1x1 --fit`"):
        pretrain.pretrain(tiny(2048), str(workdir))
    assert not workdir.exists()


@pytest.mark.slow
def test_a_fine_tuning_that_does_not_fit_stops_before_its_first_step(monkeypatch, tmp_path):
    """Its context is the longest example of its data, so the check comes once the data is read."""
    on_slice(monkeypatch, finetune, "compile_finetune", "v5e:1x1")
    config = finetune_recipe.get_config("tiny")
    config.finetune.max_train_examples = config.train.batch_size = config.train.eval_batch_size = 8192
    with pytest.raises(measure.DoesNotFit, match="does not fit, by"):
        finetune.finetune(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_loop_runs_the_executable_the_check_compiled_and_resumes_from_it(monkeypatch, tmp_path, token_cache_dir,
                                                                             caplog):
    """The program compiled for the check is the one trained with: same losses and parameters as the jit path,
    through a stop and a resume (its donation and shardings hold for restored states too)."""
    straight = tmp_path / "straight"
    pretrain.pretrain(tiny_config(token_cache_dir), str(straight))
    # This CPU as a one-chip "slice", so the check runs here as it does on a TPU VM.
    monkeypatch.setattr(slices, "attached", lambda devices: slices.TpuSlice(
        "cpu", "cpu", slices.GENERATIONS["v5e"], tuple(devices), slices.GENERATIONS["v5e"].hbm_bytes))
    checked = tmp_path / "checked"
    with caplog.at_level("INFO", logger="gpt1_jax.aot.measure"):
        pretrain.pretrain(tiny_config(token_cache_dir, **{"train.stop_at": 3}), str(checked))
        pretrain.pretrain(tiny_config(token_cache_dir), str(checked))
    assert caplog.text.count("Train step compiled in") == 2
    assert losses(checked) == losses(straight)
    assert_trees_equal(final_params(checked), final_params(straight))
