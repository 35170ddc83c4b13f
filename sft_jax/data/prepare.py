"""`python -m sft_jax.data.prepare`: tokenize and store a config's data ahead (cli.prepare)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sft_jax.cli.prepare", run_name="__main__", alter_sys=True)
