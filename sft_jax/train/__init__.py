"""One run's device program: model setup, shardings, kernels and remat chosen, the jitted steps."""
