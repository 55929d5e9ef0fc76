"""Zero-shot probes of the pre-trained language model alone (Radford et al., 2018, Sec. 5, Figure 2 right).

The paper tracks how well the generative model solves tasks before any fine-tuning, using simple
heuristics on its probabilities:
  SST-2        append the token "very" to each sentence and predict the label whose word, "positive"
               or "negative", the LM finds more probable next;
  Story Cloze  pick the ending with the higher average token log-probability given the story;
  RACE         pick the answer with the higher average token log-probability given the document
               and the question;
  CoLA         the average token log-probability of the sentence, thresholded. The paper does not give
               its threshold; here it is the median score of the examples being evaluated (a rule that
               uses no labels, and predicts half of them acceptable).
Contexts longer than n_ctx are cut from the left (see `gpt1_jax.model.scoring.score_pairs`).

The probes run from the command line (`gpt1-zeroshot`, gpt1_jax/zeroshot.py) and during pre-training
(`zeroshot_tracking`). Each takes `check_stop`, run before every batch it scores: during pre-training it
raises at a stop request, so a SIGTERM does not wait for the probes to end (`train_lib.Recipe`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from gpt1_jax.finetuning import metrics
from gpt1_jax.finetuning.task_readers import Example
from gpt1_jax.model.scoring import score_pairs
from gpt1_jax.model.transformer import GPT1
from gpt1_jax.text.tokenizer import GPT1Tokenizer

SST2_PROMPT_WORD = "very"
SST2_LABEL_WORDS = ("negative", "positive")  # in the label order of tasks.get_task("sst2")
StopCheck = Callable[[], None]  # see `gpt1_jax.model.scoring.score_pairs`


def _labels(examples: Sequence[Example]) -> np.ndarray:
    if any(ex.label is None for ex in examples):
        raise ValueError("Zero-shot probes need labelled examples; use the validation split, not test.")
    return np.asarray([int(ex.label) for ex in examples])


def _choose(model: GPT1, contexts: list[list[int]], options: list[list[list[int]]], *, average: bool,
            check_stop: StopCheck) -> np.ndarray:
    """Index of the best-scoring option of each example; options [example][choice] -> token ids."""
    pairs = [(context, option) for context, opts in zip(contexts, options) for option in opts]
    scores = [mean if average else total for total, mean in score_pairs(model, pairs, check_stop=check_stop)]
    predictions, offset = [], 0
    for opts in options:
        predictions.append(int(np.argmax(scores[offset:offset + len(opts)])))
        offset += len(opts)
    return np.asarray(predictions)


def probe_sst2(model: GPT1, tokenizer: GPT1Tokenizer, examples: Sequence[Example], *,
               check_stop: StopCheck = lambda: None) -> float:
    """Accuracy of comparing log p("negative") and log p("positive") after "<sentence> very"."""
    contexts = tokenizer.encode_batch([f"{ex.text_a} {SST2_PROMPT_WORD}" for ex in examples])
    words = [tokenizer.encode(word) for word in SST2_LABEL_WORDS]
    predictions = _choose(model, contexts, [words] * len(examples), average=False, check_stop=check_stop)
    return metrics.accuracy(predictions, _labels(examples))


def _probe_multiple_choice(model: GPT1, tokenizer: GPT1Tokenizer, examples: Sequence[Example],
                           context_of: Callable[[Example], str], check_stop: StopCheck) -> float:
    contexts = tokenizer.encode_batch([context_of(ex) for ex in examples])
    options = [tokenizer.encode_batch(list(ex.choices)) for ex in examples]
    predictions = _choose(model, contexts, options, average=True, check_stop=check_stop)
    return metrics.accuracy(predictions, _labels(examples))


def probe_story_cloze(model: GPT1, tokenizer: GPT1Tokenizer, examples: Sequence[Example], *,
                      check_stop: StopCheck = lambda: None) -> float:
    """Accuracy of picking the ending with the higher average token log-probability given the story."""
    return _probe_multiple_choice(model, tokenizer, examples, lambda ex: ex.text_a, check_stop)


def probe_race(model: GPT1, tokenizer: GPT1Tokenizer, examples: Sequence[Example], *,
               check_stop: StopCheck = lambda: None) -> float:
    """Accuracy of picking the answer with the highest average token log-probability given article + question."""
    return _probe_multiple_choice(model, tokenizer, examples, lambda ex: f"{ex.text_a} {ex.text_b}", check_stop)


def sentence_scores(model: GPT1, tokenizer: GPT1Tokenizer, sentences: Sequence[str], *,
                    check_stop: StopCheck = lambda: None) -> np.ndarray:
    """Average token log-probability of each sentence (its first token is the context)."""
    ids = tokenizer.encode_batch(list(sentences))
    short = [s for s, i in zip(sentences, ids) if len(i) < 2]
    if short:
        raise ValueError(f"Sentences need at least two tokens to be scored; got {short[:3]}.")
    return np.asarray([mean for _, mean in score_pairs(model, [(i[:1], i[1:]) for i in ids], check_stop=check_stop)])


def probe_cola(model: GPT1, tokenizer: GPT1Tokenizer, examples: Sequence[Example], *,
               check_stop: StopCheck = lambda: None) -> float:
    """Matthews correlation of "acceptable" = average token log-probability >= the median score."""
    scores = sentence_scores(model, tokenizer, [ex.text_a for ex in examples], check_stop=check_stop)
    predictions = (scores >= np.median(scores)).astype(int)
    return metrics.matthews_corr(predictions, _labels(examples))


PROBES: dict[str, tuple[Callable[..., float], str]] = {
    "sst2": (probe_sst2, "accuracy"),
    "cola": (probe_cola, "matthews_corr"),
    "story_cloze": (probe_story_cloze, "accuracy"),
    "race/middle": (probe_race, "accuracy"),
    "race/high": (probe_race, "accuracy"),
    "race/all": (probe_race, "accuracy"),
}


def run_probe(model: GPT1, tokenizer: GPT1Tokenizer, task: str, examples: Sequence[Example], *,
              check_stop: StopCheck = lambda: None) -> float:
    """The zero-shot metric of `task` on `examples`: accuracy, or the Matthews correlation for CoLA."""
    if task not in PROBES:
        raise ValueError(f"No zero-shot probe for task {task!r}; available: {sorted(PROBES)}.")
    if not examples:
        raise ValueError(f"No examples given for the {task} probe.")
    return PROBES[task][0](model, tokenizer, examples, check_stop=check_stop)
