"""Generative pre-training (L1): the recipe, its text sources, token cache and batches, and the zero-shot probes
that track it (Sec. 5)."""
