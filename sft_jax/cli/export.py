"""Exports a run: python -m sft_jax.export --workdir=WORKDIR [--which=best|last|STEP] [--out=DIR]

The merged model (and a LoRA run's PEFT adapter) in Hugging Face's layout
(sft_jax.loop.export.export_run).
"""

from __future__ import annotations

from absl import app, flags

from sft_jax import cli
from sft_jax.loop.export import export_run


def main(argv: list[str]) -> None:
    del argv
    FLAGS = flags.FLAGS  # noqa: N806 (absl's name)
    which = FLAGS.step if FLAGS.step is not None else FLAGS.which
    print(cli.run_command(lambda: export_run(FLAGS.workdir, which=which, out=FLAGS.out)))


if __name__ == "__main__":
    # Flags are defined only when run as a command: importing this module defines none.
    flags.DEFINE_string("workdir", None, "The run's WORKDIR (or its checkpoints/ folder, or URL).")
    flags.DEFINE_string("which", "best", "'best', 'last', or a step number.")
    flags.DEFINE_integer("step", None, "Step to export (overrides --which).")
    flags.DEFINE_string("out", None, "Output directory or bucket URL (default WORKDIR/export).")
    flags.mark_flag_as_required("workdir")
    cli.define_debug_flag()
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, lambda argv: None))
