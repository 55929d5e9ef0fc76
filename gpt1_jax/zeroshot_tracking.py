"""Zero-shot probes run periodically during pre-training (the paper's Figure 2, right).

The paper plots how the LM's zero-shot heuristics improve as generative pre-training goes on, the
evidence that pre-training learns task-relevant functionality. `ZeroShotTracker` reads the probe
examples once, before compilation (so a missing file fails the launch, not step 50,000), and scores
the current parameters with `gpt1_jax.zeroshot` whenever the loop asks. The values are logged as
`zeroshot/<task>` scalars, next to the validation perplexity in metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from gpt1_jax import tasks, zeroshot
from gpt1_jax.config_check import ConfigError
from gpt1_jax.data.task_inputs import read_split
from gpt1_jax.data.task_readers import Example
from gpt1_jax.tokenizer import GPT1Tokenizer


def probe_names(config: ConfigDict) -> list[str]:
    """The tasks of `zeroshot.tasks` (comma-separated), checked against the available probes."""
    names = [name.strip() for name in config.zeroshot.tasks.split(",") if name.strip()]
    unknown = [name for name in names if name not in zeroshot.PROBES]
    if unknown:
        raise ConfigError(f"zeroshot.tasks: no zero-shot probe for {unknown}; available: "
                          f"{', '.join(sorted(zeroshot.PROBES))}.")
    if config.zeroshot.every < 0 or config.zeroshot.max_examples < 0:
        raise ConfigError("zeroshot.every and zeroshot.max_examples must be >= 0 (0: every eval step, all examples).")
    return names


class ZeroShotTracker:
    """Scores a model on fixed examples of each probe task; `due(step)` says when."""

    def __init__(self, config: ConfigDict, tokenizer: GPT1Tokenizer):
        self.names = probe_names(config)
        self.every = config.zeroshot.every or config.train.eval_every
        self.last_step = config.train.num_steps
        self.tokenizer = tokenizer
        self.examples: dict[str, list[Example]] = {}
        for name in self.names:
            try:
                spec = dataclasses.replace(tasks.get_task(name), on_error=config.data.on_error)
                examples = read_split(spec, config.zeroshot.split, config)
            except (OSError, ValueError) as err:
                raise ConfigError(f"zeroshot.tasks={name!r}, zeroshot.split={config.zeroshot.split!r}: {err}") from err
            self.examples[name] = examples[:config.zeroshot.max_examples or None]

    def due(self, step: int) -> bool:
        return bool(self.names) and (step == self.last_step or bool(self.every) and step % self.every == 0)

    def evaluate(self, graphdef, params) -> dict[str, float]:
        """`zeroshot/<task>` -> the probe's metric for the model `nnx.merge(graphdef, params)`.

        With several processes the parameters are gathered first, so every process scores the
        same replicated model on its own devices (probes are small next to a train step).
        """
        if jax.process_count() > 1:
            params = multihost_utils.process_allgather(params, tiled=True)
        model = nnx.merge(graphdef, params)
        return {f"zeroshot/{name}": zeroshot.run_probe(model, self.tokenizer, name, examples)
                for name, examples in self.examples.items()}
