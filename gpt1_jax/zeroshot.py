"""`gpt1-zeroshot`: one zero-shot probe of a pre-trained language model (Sec. 5, Figure 2 right) on a task's
split; the probes themselves are `zeroshot_probes`.

Command line (installed as `gpt1-zeroshot`):
    python -m gpt1_jax.zeroshot --checkpoint DIR --task sst2 [--max_examples N] [--split validation]
"""

from __future__ import annotations

from absl import flags

from gpt1_jax import cli
from gpt1_jax.pretraining.zeroshot_probes import PROBES, run_probe
from gpt1_jax.text.tokenizer import GPT1Tokenizer

SYNOPSIS = "(--checkpoint DIR | --hf DIR) --task TASK [--split SPLIT] [--max_examples N] [--data_root DIR]"


def _define_flags(flag_values: flags.FlagValues) -> None:
    cli.define_model_flags(flag_values)
    define = dict(flag_values=flag_values)
    flags.DEFINE_enum("task", None, sorted(PROBES), "The task to probe.", required=True, **define)
    flags.DEFINE_string("split", "validation", "A labelled split of the task.", **define)
    flags.DEFINE_integer("max_examples", None, "Evaluate only the first N examples.", lower_bound=1, **define)
    flags.DEFINE_string("data_root", None, "Data folder (default: $GPT1_JAX_DATA).", **define)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.zeroshot` (`gpt1-zeroshot`); `argv` excludes the program name."""
    args = cli.parse(argv, _define_flags, prog="python -m gpt1_jax.zeroshot", synopsis=SYNOPSIS, doc=__doc__).flags

    from gpt1_jax.finetuning.task_readers import read_task
    from gpt1_jax.finetuning.tasks import get_task
    from gpt1_jax.training import checkpoint
    from gpt1_jax.weights.loading import load_model

    with checkpoint.named_by("--checkpoint"):
        model = load_model(cli.model_weights(args))
    tokenizer = GPT1Tokenizer.from_files(args.vocab_dir)
    examples = read_task(get_task(args.task), args.split, data_root=args.data_root).examples
    if args.max_examples is not None:
        examples = examples[:args.max_examples]
    value = run_probe(model, tokenizer, args.task, examples)
    print(f"{args.task} zero-shot {PROBES[args.task][1]} on {len(examples)} {args.split} examples: {value:.4f}")


if __name__ == "__main__":
    main()
