"""Is there task signal in the mini model's features at all? A linear probe, pre-trained against fresh.

Table 5 in miniature (benchmarks/table5_mini.py) asks whether fine-tuning from the shipped mini model
beats fine-tuning from scratch. When it does not, either the pre-trained features hold nothing a task
can use, or fine-tuning does not use what they hold. A linear probe separates the two: the backbone is
frozen and only a regularised linear model is fitted on its features, so a probe on the mini model that
beats the same probe on a fresh draw of the same shape means the pre-training put task signal there.

For each task of the table, on exactly its fine-tuning inputs (configs/finetune.py:mini: the same
1,000-example subset, the task's input transformation, `finetune.train_from_eval` for SciTail and QNLI)
and its reported split, two features per model:
  mean   the last hidden state averaged over each row's tokens,
  last   the hidden state at the `_classify_` token (what the fine-tuned head reads; its embedding is a
         fresh row in both models, as in fine-tuning),
summed over the two orderings of a similarity task (Sec. 3.3). The probe is logistic regression with
balanced class weights (ridge for STS-B), its strength chosen by 5-fold cross-validation on the training
examples, on standardised features; a multiple-choice task (Story Cloze) scores each ending and is
fitted on the difference between the two endings' features. The cells are the task's primary metric
x 100, as in the table.

    pip install -e '.[test]'  # scikit-learn
    GPT1_JAX_DATA=../shared/data python benchmarks/linear_probe_mini.py [--no-doc]

Rewrites the `## A linear probe of the mini model` section of docs/finetuning.md unless --no-doc.
About ten minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.doc_section import write_section  # noqa: E402
from benchmarks.table5_mini import TASKS, preset_config, reported_split  # noqa: E402
from gpt1_jax.tasks import TASKS as TASK_SPECS  # noqa: E402

DOC = ROOT / "docs" / "finetuning.md"
HEADING = "## A linear probe of the mini model"
FEATURES = ("mean", "last")
BATCH_ROWS = 64
FOLDS = 5


def task_data(task: str):
    """The task's arrays exactly as the table fine-tunes on them (subset, transformation, context)."""
    from gpt1_jax.data import task_inputs

    config = preset_config(task)
    return task_inputs.load(config, TASK_SPECS[task], config.model.n_ctx)


def models():
    """{"mini": the shipped model, "fresh": the same shape from a fresh draw}, each with fresh special-token rows."""
    from flax import nnx

    from gpt1_jax.generate import load_model
    from gpt1_jax.model import GPT1
    from gpt1_jax.vocab_files import N_SPECIAL

    mini = load_model("mini", None)
    fresh = GPT1(mini.config, rngs=nnx.Rngs(0))
    return {name: model.with_special_tokens(N_SPECIAL, rngs=nnx.Rngs(1)) for name, model in
            (("mini", mini), ("fresh", fresh))}


def features(model, arrays) -> dict[str, np.ndarray]:
    """{"mean", "last"}: [examples, rows, width] float64, from the frozen backbone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)

    @jax.jit
    def pooled(state, tokens, mask, classify_positions):
        hidden = nnx.merge(graphdef, state)(tokens).astype(jnp.float32)  # [rows, seq, width]
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        last = jnp.take_along_axis(hidden, classify_positions[:, None, None], axis=1)[:, 0]
        return mean, last

    examples, rows, seq = arrays.tokens.shape
    tokens, mask = arrays.tokens.reshape(-1, seq), arrays.mask.reshape(-1, seq)
    positions = arrays.classify_positions.reshape(-1)
    out = {name: [] for name in FEATURES}
    for start in range(0, len(tokens), BATCH_ROWS):
        chunk = slice(start, start + BATCH_ROWS)
        for name, value in zip(FEATURES, pooled(state, tokens[chunk], mask[chunk], positions[chunk])):
            out[name].append(np.asarray(value, np.float64))
    return {name: np.concatenate(parts).reshape(examples, rows, -1) for name, parts in out.items()}


def logistic():
    """L2-regularised logistic regression, its strength chosen by cross-validated log loss. Classes are
    weighted to balance: on a skewed task (CoLA: 70% acceptable) an unweighted probe predicts the majority
    for both models alike, and the comparison would say nothing."""
    from sklearn.linear_model import LogisticRegressionCV

    return LogisticRegressionCV(Cs=7, cv=FOLDS, l1_ratios=(0.0,), scoring="neg_log_loss", class_weight="balanced",
                                max_iter=5000, use_legacy_attributes=False)


def probe_score(spec, train_x, train_y, eval_x, eval_y) -> float:
    """The primary metric x 100 of a cross-validated linear probe fitted on train, scored on eval."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gpt1_jax import metrics, tasks

    if spec.kind == tasks.MULTIPLE_CHOICE:  # [examples, 2, width]: fit "is ending 0 the right one" on f0 - f1
        diff = train_x[:, 0] - train_x[:, 1]
        x, y = np.concatenate([diff, -diff]), np.concatenate([train_y == 0, train_y == 1]).astype(int)
        fitted = make_pipeline(StandardScaler(), logistic()).fit(x, y)
        predictions = np.where(fitted.decision_function(eval_x[:, 0] - eval_x[:, 1]) > 0, 0, 1)
    else:  # a similarity task's two orderings are summed, as its head sums their states
        train_x, eval_x = train_x.sum(1), eval_x.sum(1)
        if spec.kind == tasks.REGRESSION_SIMILARITY:
            fitted = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-1, 5, 7))).fit(train_x, train_y)
        else:
            fitted = make_pipeline(StandardScaler(), logistic()).fit(train_x, train_y)
        predictions = fitted.predict(eval_x)
    return 100 * metrics.compute([spec.primary_metric], predictions, eval_y)[spec.primary_metric]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of the table's tasks")
    args = parser.parse_args()
    if not os.environ.get("GPT1_JAX_DATA"):
        parser.error("set GPT1_JAX_DATA to the data root (../shared/data here)")

    chosen = args.tasks.split(",")
    nets = models()
    columns = [(net, feature) for feature in FEATURES for net in nets]
    scores = {}
    for task in chosen:
        data = task_data(task)
        split = reported_split(task)
        train = {net: features(model, data.train) for net, model in nets.items()}
        evals = {net: features(model, data.evals[split]) for net, model in nets.items()}
        scores[task] = {(net, feature): probe_score(data.spec, train[net][feature], data.train.labels,
                                                    evals[net][feature], data.evals[split].labels)
                        for net, feature in columns}
        print(task, {f"{net}/{feature}": round(value, 1) for (net, feature), value in scores[task].items()},
              flush=True)

    lines = [HEADING, "",
             "Generated by `benchmarks/linear_probe_mini.py` (its docstring says how): a linear model fitted on "
             "the frozen features of the shipped mini model and of a fresh draw of the same shape, on each "
             "table task's 1,000 fine-tuning examples, scored on the table's split (primary metric x 100). "
             "Where the mini column does not beat the fresh one, the pre-trained features hold no more of that "
             "task than random ones do, and no fine-tuning recipe can be expected to transfer much.", "",
             "| task (metric, split) | " + " | ".join(f"{net}, {feature}" for net, feature in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for task in chosen:
        lines.append(f"| {task} ({TASK_SPECS[task].primary_metric}, {reported_split(task)}) | "
                     + " | ".join(f"{scores[task][column]:.1f}" for column in columns) + " |")
    print("\n".join(lines))
    if not args.no_doc:
        write_section(HEADING, "\n".join(lines), DOC)


if __name__ == "__main__":
    main()
