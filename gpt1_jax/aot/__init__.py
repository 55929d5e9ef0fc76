"""Ahead-of-time compilation for a TPU slice, from any machine: will a run fit, and what it runs.

`slices` turns a slice name (`v5e:2x2`, `v5litepod-16`) into the chips libtpu describes without a
TPU; `steps` compiles a run's real train and evaluation steps for them (`compile_for_topology`);
`hlo_stats` reads the optimized program (argument bytes as laid out, collectives per step); `fit`
finds the smallest change that makes a run fit; `report` prints it all. `python -m gpt1_jax.compile`
is the command line, and `train.py` runs the same check on a real slice before its first step.
"""
