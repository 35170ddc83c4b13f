"""Entry point: python main.py --config=configs/base.py --workdir=DIR [--config.train.steps=N]

Add --debug (or SFT_JAX_DEBUG=1) to see the traceback behind an error message.

Only light modules are imported at the top: a tokenizer worker process (spawned) runs this
file again as __mp_main__, and must not import JAX, flax or orbax to do it.
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from sft_jax import cli
from sft_jax.cli.overrides import unknown_override
from sft_jax.core.errors import TrainingDivergedError
from sft_jax.core.spec import RunSpec
from sft_jax.data.cloud import is_remote

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string(
    "workdir", None, "Directory (or s3:// / gs:// URL) for metrics, TensorBoard and checkpoints."
)
flags.mark_flags_as_required(["config", "workdir"])
cli.define_debug_flag()


def main(argv: list[str]) -> None:
    del argv
    from sft_jax.loop import trainer
    from sft_jax.train.setup import open_run_data
    from sft_jax.workdir import rundir
    from sft_jax.workdir.checkpointing import CheckpointSaveError

    # Failures after training started, where what is saved matters; not config or data errors.
    mid_run = (TrainingDivergedError, CheckpointSaveError, OSError)
    # A bucket URL stays a string (pathlib would make 's3:/...' of it): trainer.run stages it.
    remote = is_remote(FLAGS.workdir)
    created = not remote and not Path(FLAGS.workdir).expanduser().exists()
    workdir = FLAGS.workdir if remote else cli.writable_directory(FLAGS.workdir)

    def train() -> dict:
        try:
            return trainer.run(RunSpec.of(FLAGS.config), workdir, data_factory=open_run_data)
        finally:
            if created:  # a run that stops before writing anything leaves no empty WORKDIR
                rundir.remove_if_empty(workdir)

    cli.run_command(
        train,
        saved_note=lambda error: (
            rundir.saved_note(workdir) if isinstance(error, mid_run) and not remote else ""
        ),
    )


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, unknown_override))
