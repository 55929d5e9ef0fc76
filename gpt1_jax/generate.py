"""Sampling from GPT-1 on the command line (installed as `gpt1-generate`).

    python -m gpt1_jax.generate --checkpoint DIR --prompt "..." [--max_new_tokens N --temperature T
        --top_k K --top_p P --seed S --greedy]
    python -m gpt1_jax.generate --hf DIR --prompt "..."      # a transformers OpenAIGPT folder

The sampling itself (a key/value cache, one compiled step per token) is `gpt1_jax.model.sampling`; the model
comes from `gpt1_jax.weights.loading`.
"""

from __future__ import annotations

import logging
import math

import jax
from absl import flags

from gpt1_jax import cli
from gpt1_jax.model.sampling import generate
from gpt1_jax.weights.loading import load_model

log = logging.getLogger(__name__)

SYNOPSIS = "(--checkpoint DIR | --hf DIR) --prompt TEXT [--max_new_tokens N --top_p P --seed S ...]"


def _define_flags(flag_values: flags.FlagValues) -> None:
    cli.define_model_flags(flag_values)
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("prompt", None, "The text to continue.", required=True, **define)
    flags.DEFINE_integer("max_new_tokens", 50, "How many tokens to sample.", lower_bound=1, **define)
    flags.DEFINE_float("temperature", 1.0, "Divides the logits before sampling (0: greedy).", lower_bound=0.0,
                       **define)
    flags.register_validator("temperature", math.isfinite, "--temperature must be a finite number", **define)
    flags.DEFINE_integer("top_k", None, "Sample among the K most likely tokens only.", lower_bound=1, **define)
    flags.DEFINE_float("top_p", None, "Nucleus sampling: the smallest set of tokens with probability >= P.",
                       lower_bound=0.0, upper_bound=1.0, **define)
    flags.DEFINE_integer("seed", 0, "The sampling key, jax.random.key(seed).", lower_bound=0, upper_bound=2**63 - 1,
                         **define)
    flags.DEFINE_boolean("greedy", False, "Take the most likely token at every step.", **define)


def _warn_of_bytes_that_are_not_utf8(prompt: str) -> None:
    """Name each byte of the prompt that is not UTF-8, which the tokenizer reads as U+FFFD.

    Python decodes a command line as UTF-8 and keeps a byte that is not (a Latin-1 terminal's "é") as a lone
    surrogate, U+DC80 + byte ("surrogateescape"); the prompt then silently held "�" where the user typed a letter.
    """
    found = [(position, ord(char) - 0xDC00) for position, char in enumerate(prompt) if "\udc80" <= char <= "\udcff"]
    if found:
        where = ", ".join(f"0x{byte:02x} at character {position}" for position, byte in found)
        log.warning("--prompt holds %d byte(s) that are not UTF-8 (%s, counting from 0), each read as U+FFFD; give "
                    "the prompt in UTF-8 (is the terminal's encoding UTF-8?).", len(found), where)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.generate` (`gpt1-generate`); `argv` excludes the program name."""
    command = cli.parse(argv, _define_flags, prog="python -m gpt1_jax.generate", synopsis=SYNOPSIS,
                        doc=__doc__)
    args = command.flags
    _warn_of_bytes_that_are_not_utf8(args.prompt)

    from gpt1_jax.text.tokenizer import GPT1Tokenizer
    from gpt1_jax.training import checkpoint

    with checkpoint.named_by("--checkpoint"):
        model = load_model(cli.model_weights(args))
    tokenizer = GPT1Tokenizer.from_files(args.vocab_dir)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        command.fail("the prompt encodes to no tokens; give some text")
    try:
        new_ids = generate(model, prompt_ids, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                           greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as err:
        command.fail(str(err))
    print(tokenizer.decode(list(prompt_ids) + new_ids.tolist()))


if __name__ == "__main__":
    main()
