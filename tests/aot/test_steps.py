"""A run's real steps compiled for TPU slices on this CPU machine: memory per chip, FITS, collectives, FLOPs."""

import re

import jax
import pytest

from gpt1_jax.aot import steps
from gpt1_jax.aot.slices import GiB
from gpt1_jax.configs import finetune as finetune_recipe
from gpt1_jax.configs import gpt1_pretrain, tiny_pretrain
from gpt1_jax.constants import N_SPECIAL
from gpt1_jax.finetuning import finetune_start
from gpt1_jax.pretraining import pretrain


def paper_pretraining():
    config = gpt1_pretrain.get_config()
    config.model.dtype = "bfloat16"
    return config


def assert_memory_is_xlas(step):
    """The report's memory is memory_analysis()'s, its arguments split by kind, and FITS is total <= HBM."""
    analysis, memory = step.memory_analysis, step.memory
    assert memory.parameters + memory.optimizer_state + memory.batch == analysis["argument_size_in_bytes"]
    assert memory.temporaries == analysis["temp_size_in_bytes"]
    assert memory.outputs == analysis["output_size_in_bytes"] - analysis["alias_size_in_bytes"]
    assert memory.program == analysis["generated_code_size_in_bytes"]
    assert step.margin == step.hbm_bytes - memory.total and step.fits == (memory.total <= step.hbm_bytes)


@pytest.mark.slow
def test_the_papers_pretraining_config_in_bfloat16_fits_a_v5e_2x2_as_memory_analysis_counts_it():
    report = steps.compile_for_topology(paper_pretraining(), "v5e:2x2")
    assert (report.slice.chips, report.slice.hosts, report.mesh) == (4, 1, {"data": 4, "fsdp": 1})
    assert [step.name for step in report.steps] == ["train step", "eval step"]
    train, evaluation = report.steps
    for step in report.steps:
        assert_memory_is_xlas(step)
    params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        lambda: pretrain.initial_params(pretrain.model_config(paper_pretraining()), 0))))
    assert 4 * params <= train.memory.parameters < 1.01 * 4 * params  # float32, replicated (fsdp 1), tiles padded
    assert train.memory.optimizer_state == pytest.approx(2 * train.memory.parameters, rel=0.01)  # Adam's m and v
    assert train.fits and train.memory.total < train.hbm_bytes == int(15.75 * GiB)
    assert evaluation.memory.optimizer_state == 0 and evaluation.memory.total < train.memory.total
    # Pure data parallelism: the gradients are all-reduced; nothing is gathered or scattered.
    assert set(train.collectives) == {"all-reduce"}
    assert train.model_flops == pretrain.train_flops_per_token(pretrain.model_config(paper_pretraining()), 512) \
        * 64 * 512 / 4
    # On a TPU the layers are unrolled and attention with dropout runs in the fused kernels, once per layer
    # each way: no [batch, heads, seq, seq] array of the chip's 16 sequences anywhere, 6.5 GiB at most.
    assert "layers auto, attention auto" in report.shapes
    for kernel in ("gpt1_attention_forward", "gpt1_attention_backward"):
        assert len(set(re.findall(rf"{kernel}[^\n]*", train.hlo))) >= 12, kernel
    assert "[16,12,512,512]" not in train.hlo
    assert train.memory.temporaries <= 6.5 * GiB


@pytest.mark.slow
def test_the_papers_pretraining_config_compiles_for_a_two_host_slice():
    """v5p-16: 8 chips on 2 hosts (v4-16 is the same shape; its compiler takes 4x as long on 2 cores). The
    layers scanned: unrolled, the paper's step takes this machine two minutes to compile."""
    config = paper_pretraining()
    config.model.layers = "scan"
    report = steps.compile_for_topology(config, "v5p:2x2x2", only=("train step",))
    (train,) = report.steps
    assert (report.slice.chips, report.slice.hosts, report.slice.chip_kind) == (8, 2, "TPU v5")
    assert "8 per chip per micro-batch" in report.shapes and report.mesh == {"data": 8, "fsdp": 1}
    assert_memory_is_xlas(train)
    assert train.fits and train.hbm_bytes == int(95.74 * GiB)


def small_pretraining(fsdp: int):
    config = tiny_pretrain.get_config()
    config.train.batch_size, config.train.loss_chunk, config.train.eval_every = 64, 256, 0
    config.mesh.fsdp = fsdp
    return config


@pytest.mark.slow
def test_fsdp_shards_parameters_and_optimizer_state_over_its_chips_with_gathers_and_reduce_scatters():
    reports = {n: steps.compile_for_topology(small_pretraining(n), "v5e:2x2").steps[0] for n in (1, 2, 4)}
    state = {n: step.memory.parameters + step.memory.optimizer_state for n, step in reports.items()}
    for n in (2, 4):  # all but biases and LayerNorm gains are sharded; tiles pad the small shards a little
        assert state[1] / state[n] == pytest.approx(n, rel=0.05)
        assert {"all-gather", "reduce-scatter"} <= set(reports[n].collectives)
    # Data parallelism alone, with the chunked LM loss: no gathers, no scatters.
    assert set(reports[1].collectives) == {"all-reduce"}


def story_cloze_from_mini():
    config = finetune_recipe.get_config("story_cloze")
    config.init = "mini"
    return config


@pytest.mark.slow
def test_a_multiple_choice_fine_tuning_compiles_with_its_special_tokens_and_choice_rows():
    config = story_cloze_from_mini()
    assert finetune_start.init_model_config(config).n_special == N_SPECIAL
    report = steps.compile_for_topology(config, "v5e:2x2")
    train, predict = report.steps
    assert report.run == "fine-tuning story_cloze (multiple_choice)"
    header = train.hlo.split("\n", 1)[0]
    # 32 stories over 4 chips, 2 endings each, the mini model's full context of 128; one logit per ending.
    assert "s32[8,2,128]" in header and "f32[192,1]" in header
    assert "gpt1_attention_backward" in train.hlo  # the fine-tuning step's attention dropout, fused too
    assert_memory_is_xlas(train)
    assert train.fits and predict.fits


@pytest.mark.slow
def test_a_custom_task_compiles_as_the_run_would_build_it(tmp_path):
    questions = tmp_path / "train.csv"
    questions.write_text("question,a,b,c,answer\nWhich?,one,two,three,0\n")
    config = finetune_recipe.get_config("custom")
    config.init = "mini"
    config.custom.update(kind="multiple_choice", train=str(questions), validation=str(questions), text_a="question",
                         choices="a,b,c", label="answer")
    config.model.layers = "scan"  # the task's plumbing is the point; scanned, it compiles in a third of the time
    train, _ = steps.compile_for_topology(config, "v5e:2x2").steps
    assert "s32[8,3,128]" in train.hlo.split("\n", 1)[0] and train.fits
