"""`python -m sft_jax.evaluate`: evaluate a model on lm-eval tasks (sft_jax.cli.evaluate)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sft_jax.cli.evaluate", run_name="__main__", alter_sys=True)
