"""The training loop and what follows it: trainer, preemption signals, export."""
