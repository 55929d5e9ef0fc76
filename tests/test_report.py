"""The report table and the curves, from real run directories."""

import pytest

from configs import finetune as finetune_recipe
from gpt1_jax import finetune, pretrain, report
from pretrain_helpers import tiny_config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_cache_dir):
    pretrain_dir = tmp_path_factory.mktemp("pretrain-run")
    pretrain.pretrain(tiny_config(token_cache_dir, **{"train.eval_every": 6}), str(pretrain_dir))
    finetune_dir = tmp_path_factory.mktemp("sst2-run")
    config = finetune_recipe.get_config("tiny")
    config.data.task_source = "local"
    config.finetune.max_train_examples = 64
    config.checkpoint.async_save = False
    finetune.finetune(config, str(finetune_dir))
    return pretrain_dir, finetune_dir


def test_report_puts_our_numbers_next_to_the_papers(runs, tmp_path):
    pretrain_dir, finetune_dir = runs
    out = tmp_path / "report.md"
    report.main([str(pretrain_dir), str(finetune_dir), "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0] == report.HEADER[0] and len(lines) == 4
    pretrain_row, finetune_row = lines[2].split(" | "), lines[3].split(" | ")
    assert "pre-training (step 6)" in pretrain_row[1] and float(pretrain_row[4]) > 1.0
    assert finetune_row[1:4] == ["sst2", "validation", "accuracy"]
    ours, paper, difference = float(finetune_row[4]), float(finetune_row[5]), float(finetune_row[6].rstrip(" |"))
    assert 0.0 <= ours <= 100.0 and paper == 91.3
    assert difference == pytest.approx(ours - paper, abs=0.11)


def test_plots_are_valid_pngs(runs, tmp_path):
    report.main([str(d) for d in runs] + ["--out", str(tmp_path / "r.md"), "--plots", str(tmp_path / "plots")])
    for run in runs:
        png = (tmp_path / "plots" / f"{run.name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    with pytest.raises(report.ReportError, match=str(tmp_path)):
        report.render([tmp_path])
