"""`python -m sft_jax.export`: export a run to Hugging Face (sft_jax.cli.export)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sft_jax.cli.export", run_name="__main__", alter_sys=True)
