"""Training: the loop, checkpoints, tracking."""
