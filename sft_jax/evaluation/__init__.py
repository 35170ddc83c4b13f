"""Evaluation of a model on lm-evaluation-harness tasks (model type "sft_jax")."""
