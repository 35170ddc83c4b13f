"""sft_jax: supervised fine-tuning of Hugging Face causal LMs in JAX / Flax NNX."""

__version__ = "0.1.0"
