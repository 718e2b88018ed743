"""Training: SamModule, the interactive episode, the loss, optimiser and schedule, metrics."""
