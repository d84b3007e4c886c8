"""Training: trainer loop, optimiser and schedule, checkpoints, logging."""
