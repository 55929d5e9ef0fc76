"""Zero-shot probes run periodically during pre-training (the paper's Figure 2, right).

The paper plots how the LM's zero-shot heuristics improve as generative pre-training goes on, the
evidence that pre-training learns task-relevant functionality. `ZeroShotTracker` reads the probe
examples once, before compilation (so a missing file fails the launch, not step 50,000), and scores
the current parameters with `gpt1_jax.pretraining.zeroshot_probes` whenever the loop asks. The values are logged as
`zeroshot/<task>` scalars, next to the validation perplexity in metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from flax import nnx
from jax.experimental import multihost_utils

from gpt1_jax.finetuning import tasks
from gpt1_jax.finetuning.task_inputs import TaskDataOptions, read_split
from gpt1_jax.finetuning.task_readers import Example
from gpt1_jax.pretraining import zeroshot_probes
from gpt1_jax.text.tokenizer import GPT1Tokenizer


def probe_names(text: str) -> list[str]:
    """The comma-separated task names of `text`; a ValueError naming those with no probe."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in zeroshot_probes.PROBES]
    if unknown:
        raise ValueError(f"no zero-shot probe for {unknown}; available: {', '.join(sorted(zeroshot_probes.PROBES))}.")
    return names


def probe_examples(name: str, split: str, max_examples: int, options: TaskDataOptions, on_error: str) -> list[Example]:
    """The first `max_examples` (0: all) examples of task `name`'s `split`, as its probe scores them."""
    spec = dataclasses.replace(tasks.get_task(name), on_error=on_error)
    return read_split(spec, split, options)[:max_examples or None]


class ZeroShotTracker:
    """Scores a model on fixed examples of each probe task; `due(step)` says when: every `every` steps
    (0: never but the last) and at `last_step`."""

    def __init__(self, examples: dict[str, list[Example]], every: int, last_step: int, tokenizer: GPT1Tokenizer):
        self.examples, self.every, self.last_step, self.tokenizer = examples, every, last_step, tokenizer
        self.names = list(examples)

    def due(self, step: int) -> bool:
        return bool(self.names) and (step == self.last_step or bool(self.every) and step % self.every == 0)
    def evaluate(self, graphdef, params, check_stop: Callable[[], None] = lambda: None) -> dict[str, float]:
        """`zeroshot/<task>` -> the probe's metric for the model `nnx.merge(graphdef, params)`.

        With several processes the parameters are gathered first, so every process scores the
        same replicated model on its own devices (probes are small next to a train step).
        `check_stop()` runs before each batch the probes score, and raises to abandon them (a stop request).
        """
        if jax.process_count() > 1:
            params = multihost_utils.process_allgather(params, tiled=True)
        model = nnx.merge(graphdef, params)
        return {f"zeroshot/{name}": zeroshot_probes.run_probe(model, self.tokenizer, name, examples,
                                                              check_stop=check_stop)
                for name, examples in self.examples.items()}
