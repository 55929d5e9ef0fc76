"""What every recipe trains with: the loop, the optimizer, the mesh and its processes, checkpoints, preemption,
the run log and the workdir guard. Nothing here knows the recipe's config file."""
