"""The training loop and what it needs: optimizer and schedule, loss, checkpoints, progress."""
