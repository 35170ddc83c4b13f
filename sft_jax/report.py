"""`python -m sft_jax.report RUN [RUN ...] [--out FILE]`: runs' curves side by side
(sft_jax.cli.report)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("sft_jax.cli.report", run_name="__main__", alter_sys=True)
