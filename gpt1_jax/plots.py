"""Curves of a run from its `metrics.jsonl`: loss, perplexity, learning rate, validation metrics.

matplotlib draws them (a dependency because a readable PNG is not worth writing by hand);
the Agg backend needs no display, so this works on TPU VMs and in CI.
"""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gpt1_jax import storage  # noqa: E402
from gpt1_jax.errors import UserError  # noqa: E402
from gpt1_jax.training.run_log import METRICS_FILE, read_metrics  # noqa: E402

PANELS = (
    ("loss", ("loss", "task_loss", "lm_loss", "val_loss")),
    ("perplexity", ("perplexity", "val_perplexity")),
    ("learning rate", ("lr",)),
)


class PlotError(UserError, ValueError):
    """A run with nothing to draw: no metrics.jsonl, or none of the quantities of `PANELS` in it."""


def _series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(m["step"], m[key]) for m in metrics if key in m]
    return [s for s, _ in points], [v for _, v in points]


def _validation_keys(metrics: list[dict]) -> list[str]:
    """Fine-tuning writes '<split>/<metric>' scalars; each gets a line in the last panel."""
    return sorted({k for m in metrics for k in m if "/" in k})


def plot_run(run: str | os.PathLike, out_dir: str | os.PathLike) -> storage.Path:
    """Write `<out_dir>/<run name>.png` with one panel per quantity over training steps.

    A run with nothing to draw raises PlotError rather than writing an empty figure.
    """
    run, out_dir = storage.path(run), storage.path(out_dir)
    if not (run / METRICS_FILE).is_file():
        raise PlotError(f"{run}: no {METRICS_FILE} to plot; pass a train.py --workdir.")
    metrics = read_metrics(run)
    panels = [(title, [k for k in keys if any(k in m for m in metrics)]) for title, keys in PANELS]
    panels.append(("validation metrics", _validation_keys(metrics)))
    panels = [(title, keys) for title, keys in panels if keys]
    if not panels:
        plotted = ", ".join(key for _, keys in PANELS for key in keys)
        raise PlotError(f"{run / METRICS_FILE}: nothing to plot in its {len(metrics)} records: none has {plotted} "
                        "or a <split>/<metric> score (has the run logged a step yet?).")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            steps, values = _series(metrics, key)
            axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        if title == "perplexity":
            axis.set_yscale("log")
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize="small")
    fig.suptitle(run.name)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    path = out_dir / f"{run.name}.png"
    storage.write_whole(path, png.getvalue())
    return path
