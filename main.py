"""Entry point: python main.py --config=configs/base.py --workdir=DIR [--config.train.steps=N]"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from sft_jax import config_check, trainer
from sft_jax.data import open_run_data
from sft_jax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, TensorBoard events and checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])

# Problems with the user's config, data or model, or a diverged run: one message, no traceback.
USER_ERRORS = (UserError, trainer.TrainingDivergedError)


def main(argv: list[str]) -> None:
    del argv
    # Our progress at INFO; the libraries' (orbax logs every save and restore) at WARNING.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("sft_jax").setLevel(logging.INFO)
    try:
        trainer.run(FLAGS.config, FLAGS.workdir, data_factory=open_run_data)
    except USER_ERRORS as e:
        sys.exit(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a mistyped --config.* field named instead of a traceback."""
    try:
        return FLAGS(argv)
    except (AttributeError, KeyError) as e:
        sys.exit(f"error: {config_check.unknown_override(argv) or e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
