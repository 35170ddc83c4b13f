"""What a run leaves on disk: checkpoints, run directory and lock, bucket mirror, metrics."""
