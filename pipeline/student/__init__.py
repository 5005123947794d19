"""Student stage: paired data, losses, the per-worker train loop, checkpoints, evaluation."""
