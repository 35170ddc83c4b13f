"""`python -m sft_jax.data.inspect`: what a config's data renders to and trains (cli.inspect)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sft_jax.cli.inspect", run_name="__main__", alter_sys=True)
