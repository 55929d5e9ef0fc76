"""Tests of gpt1_jax.aot: compiling for TPU slices that libtpu describes, with no TPU."""
