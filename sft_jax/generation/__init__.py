"""Sampling from the live (sharded) policy: the greedy/temperature sampler and eval replies."""
