"""Discriminative fine-tuning (L3 = L2 + 0.5 L1): the tasks, a user's own task, their readers and input
transformations (Sec. 3.3), the metrics, the recipe, its starting points and its results."""
