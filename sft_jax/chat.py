"""`python -m sft_jax.chat`: chat with a trained model (sft_jax.cli.chat)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sft_jax.cli.chat", run_name="__main__", alter_sys=True)
