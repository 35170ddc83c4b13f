"""Two runs of the demo in one process, the second resuming the first, logging to every
experiment tracker (tests/workdir/test_trackers.py sets their local stores).

  python tests/tracking_worker.py WORKDIR
Prints the two summaries as one JSON line.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import folders_on_path  # noqa: F401 (every folder of test modules on sys.path)

from configs import base
from sft_jax.loop import trainer
from sft_jax.train.setup import open_run_data


def demo_config(steps: int):
    """The demo, small: 8 rows a step, eval at 0, 2 and 4 on 8 examples, 2 samples shown."""
    config = base.get_config()
    config.train.steps = steps
    config.train.global_batch_size = 8
    config.eval.global_batch_size = 8
    config.data.eval_max_examples = 8
    config.eval.every_steps = 2
    config.eval.generate_examples = 2
    config.eval.show_samples = 2
    config.eval.max_new_tokens = 4
    config.log.every_steps = 1
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.export.at_end = "none"
    config.log.trackers = ("tensorboard", "wandb", "trackio", "mlflow")
    return config


def main() -> None:
    workdir = Path(sys.argv[1])
    first = trainer.run(demo_config(steps=2), workdir, open_run_data)
    resumed = trainer.run(demo_config(steps=4), workdir, open_run_data)
    plain = [{k: v for k, v in s.items() if not isinstance(v, dict)} for s in (first, resumed)]
    print(json.dumps(plain))


if __name__ == "__main__":
    main()
