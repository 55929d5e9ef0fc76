"""Pallas kernels, each with the plain-JAX reference its tests compare it against (interpret mode on CPU)."""
