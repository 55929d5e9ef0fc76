"""Will it fit on the pod? Compile a run's real steps for a TPU slice on any machine, before creating the slice.

    python -m gpt1_jax.compile --topology v5e:2x2 --config configs/gpt1_pretrain.py --config.model.dtype=bfloat16
    python -m gpt1_jax.compile --topology v5litepod-16 --config configs/finetune.py:race/all --fit

Installed as `gpt1-compile`. It takes train.py's `--config` and `--config.*` overrides, and compiles the
train and evaluation steps the run would compile, with libtpu describing the slice (no TPU needed:
`pip install -e '.[tpu]'`). Per step it prints the memory per chip (parameters, optimizer state, batch,
temporaries) against the chip's HBM, FITS or DOES NOT FIT with the margin, the collectives a step runs,
and its FLOPs. A run that does not fit gets the change of `mesh.fsdp`, `model.remat` or
`train.grad_accum_steps` that makes it fit, each compiled; `--fit` searches them together.

Exit status: 0 when the run fits, 1 when it does not (also when --fit found a config that does), 2 for bad
input (a slice name, a mesh or batch that does not divide the slice, libtpu missing or of the wrong release).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import jax
from absl import flags

from gpt1_jax import cli, recipe_flags, storage
from gpt1_jax.aot import slices

SYNOPSIS = f"--topology SLICE {recipe_flags.CONFIG_SYNOPSIS} [--json FILE] [--hlo DIR] [--fit]"
DOES_NOT_FIT_STATUS = 1


def _define_flags(flag_values: flags.FlagValues) -> None:
    define = dict(flag_values=flag_values)
    flags.DEFINE_string("topology", None, f"The TPU slice: {slices.ACCEPTED}.", required=True, **define)
    flags.DEFINE_string("json", None, "Also write the report to this file, one JSON object (memory in bytes per "
                        "chip).", **define)
    flags.DEFINE_string("hlo", None, "Write each step's optimized program (HLO text) into this folder.", **define)
    flags.DEFINE_boolean("fit", False, "If the run does not fit, search mesh.fsdp, then model.remat, then "
                         "train.grad_accum_steps for the first config that fits and print it as --config.* flags.",
                         **define)


@cli.reports_user_errors
def main(argv: list[str] | None = None) -> None:
    """`python -m gpt1_jax.compile` (`gpt1-compile`); `argv` excludes the program name."""
    argv = sys.argv[1:] if argv is None else argv
    args = recipe_flags.parse(argv, _define_flags, prog="python -m gpt1_jax.compile", synopsis=SYNOPSIS,
                              doc=__doc__).flags
    if "JAX_PLATFORMS" not in os.environ:
        # The slice's chips are libtpu's description; this machine only compiles (on a TPU VM, without taking
        # the TPU from a run that may be using it).
        jax.config.update("jax_platforms", "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(asctime)s %(name)s] %(message)s")
    logging.getLogger("gpt1_jax").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    tpu = slices.resolve(args.topology)  # a bad name fails here, before the training stack is imported
    from gpt1_jax.aot import fit, report, steps

    result = steps.compile_for_topology(args.config, tpu)
    print(report.text(result))
    found = searched = None
    if not result.fits:
        search = fit.FitSearch(result, args.config)
        over = "; ".join(f"the {step.name} by {-step.margin / slices.GiB:.3f} GiB" for step in result.steps
                         if not step.fits)
        print(f"\nThe run DOES NOT FIT on {result.slice.topology}: {over} per chip.")
        found = search.suggestions()
        print(report.suggestions_text(found))
        if args.fit:
            searched = search.search()
            print(report.search_text(searched))
    elif args.fit:
        print("\nFits as given: nothing to change.")
    if args.hlo:
        folder = storage.path(args.hlo)
        for step in result.steps:
            if not step.refused:  # a refused step has no program
                storage.write_whole(folder / f"{step.name.replace(' ', '_')}.hlo.txt", step.hlo)
    if args.json:
        document = report.as_json(result, found, searched, search_done=args.fit and not result.fits)
        storage.write_whole(storage.path(args.json), json.dumps(document, indent=2) + "\n")
    if not result.fits:
        raise SystemExit(DOES_NOT_FIT_STATUS)


if __name__ == "__main__":
    main()
