"""Training engine: the one loop every method runs in, checkpoints, evaluation, logging."""
