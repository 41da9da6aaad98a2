"""Stages 2-3: what both recipes train with: the loop, the step, checkpoints, data, losses, records."""
