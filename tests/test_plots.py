"""gpt1_jax/plots.py: a run's metrics.jsonl drawn as one PNG, one panel per quantity it logged."""

import json
import math
import re
import struct

import pytest

from gpt1_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_run(folder, keys, steps=range(1, 41)):
    """A workdir whose metrics.jsonl logs `keys` at every step, as RunLog writes it."""
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": step, **{key: 1.0 + 1.0 / step for key in keys}}) for step in steps]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 5_000
    return struct.unpack(">II", data[16:24])


def test_plot_run_writes_a_png_named_after_the_run(tmp_path):
    run = make_run(tmp_path / "tiny-pretrain", ["loss", "perplexity", "lr"])
    path = plots.plot_run(run, tmp_path / "plots" / "nested")
    assert path == tmp_path / "plots" / "nested" / "tiny-pretrain.png"
    assert png_size(path) == (3 * 450, 350)  # 4.5 x 3.5 inches per panel at 100 dpi


@pytest.mark.parametrize("keys, panels", [
    (["loss"], 1),
    (["loss", "val_loss", "lr"], 2),  # both losses share the loss panel
    (["loss", "val_perplexity", "lr", "grad_norm"], 3),  # a quantity with no panel is not drawn
    (["task_loss", "lr", "validation/accuracy", "test/accuracy"], 3),  # fine-tuning's split/metric scalars
], ids=["loss", "two-losses", "unplotted-key", "fine-tuning"])
def test_the_figure_has_one_panel_per_quantity_the_run_logged(tmp_path, keys, panels):
    path = plots.plot_run(make_run(tmp_path / "run", keys), tmp_path / "plots")
    assert png_size(path) == (panels * 450, 350)


def test_a_run_that_diverged_still_gets_its_curves(tmp_path):
    run = make_run(tmp_path / "diverged", ["loss", "perplexity"], steps=range(1, 5))
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "loss": math.nan, "perplexity": math.inf}) + "\n")
    assert png_size(plots.plot_run(run, tmp_path / "plots")) == (2 * 450, 350)


@pytest.mark.parametrize("keys", [["grad_norm", "tokens_per_s"], []], ids=["nothing-plottable", "no-records"])
def test_a_run_with_nothing_to_draw_is_named_and_no_empty_figure_written(tmp_path, keys):
    run = make_run(tmp_path / "run", keys, steps=range(1, 5) if keys else [])
    with pytest.raises(plots.PlotError, match=rf"{re.escape(str(run / 'metrics.jsonl'))}: nothing to plot in its "
                                              rf"{4 if keys else 0} records"):
        plots.plot_run(run, tmp_path / "plots")
    assert not (tmp_path / "plots" / "run.png").exists()


def test_a_folder_without_metrics_is_named(tmp_path):
    with pytest.raises(plots.PlotError, match=rf"{re.escape(str(tmp_path))}: no metrics.jsonl to plot"):
        plots.plot_run(tmp_path, tmp_path / "plots")
