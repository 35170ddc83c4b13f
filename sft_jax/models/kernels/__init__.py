"""Kernels the model layers call: fused attention (cuDNN, Pallas splash), blockwise, grouped."""
