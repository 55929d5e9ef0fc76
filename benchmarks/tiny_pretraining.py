"""How fast does the tiny recipe leave the unigram plateau? Validation perplexity per optimizer variant.

Runs `configs/tiny_pretrain.py` on the local books once per variant (each a set of config overrides),
and prints a markdown row per variant: validation perplexity at every 100 steps and its ratio to the
unigram baseline on the same held-out windows. The table and what it shows are in the "Tiny
pre-training" section of docs/benchmarks.md. About 3-4 minutes per variant on a 2-core CPU.

    pip install -e . && GPT1_JAX_DATA=../shared/data python benchmarks/tiny_pretraining.py [--variants old,tiny]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

from configs import tiny_pretrain  # noqa: E402
from gpt1_jax import pretrain  # noqa: E402
from gpt1_jax.data.lm_pipeline import LMData  # noqa: E402
from gpt1_jax.run_log import read_metrics  # noqa: E402

VARIANTS = {
    "old": ("Adam (0.9, 0.999), lr 1e-2, warm-up 50", {"optimizer.lr": 1e-2, "optimizer.b1": 0.9,
                                                         "optimizer.b2": 0.999, "optimizer.warmup_steps": 50}),
    "b2_099": ("Adam (0.9, 0.99), lr 1e-2, warm-up 50", {"optimizer.lr": 1e-2, "optimizer.b1": 0.9,
                                                        "optimizer.b2": 0.99, "optimizer.warmup_steps": 50}),
    "b1_08": ("Adam (0.8, 0.95), lr 2e-3, no warm-up", {"optimizer.lr": 2e-3, "optimizer.b1": 0.8,
                                                       "optimizer.b2": 0.95, "optimizer.warmup_steps": 0}),
    "tiny": ("Adam (0.5, 0.9), lr 3e-3, no warm-up (configs/tiny_pretrain.py)", {}),
}


def run(overrides: dict, steps: int, workdir: pathlib.Path) -> tuple[dict[int, float], float]:
    config = tiny_pretrain.get_config()
    config.train.num_steps = steps
    config.train.eval_every = 100
    config.checkpoint.every = steps
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    pretrain.pretrain(config, str(workdir))
    validation = {m["step"]: m["val_perplexity"] for m in read_metrics(workdir) if "val_perplexity" in m}
    return validation, LMData.build(config).unigram_perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {sorted(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    rows = []
    for name in names:
        label, overrides = VARIANTS[name]
        with tempfile.TemporaryDirectory() as workdir:
            validation, unigram = run(overrides, args.steps, pathlib.Path(workdir))
        cells = " | ".join(f"{validation[s]:.0f}" for s in sorted(validation))
        rows.append(f"| {label} | {cells} | {validation[max(validation)] / unigram:.2f} |")
    print(f"\nunigram baseline {unigram:.1f}; validation perplexity every 100 steps, last / unigram")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
