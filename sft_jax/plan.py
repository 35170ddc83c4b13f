"""`python -m sft_jax.plan`: the pre-flight planner (sft_jax.cli.plan)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sft_jax.cli.plan", run_name="__main__", alter_sys=True)
