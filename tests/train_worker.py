"""A training run in its own process, for kill / signal / resume tests.

  python tests/train_worker.py MODEL_DIR WORKDIR STEPS
Trains on SyntheticBatches with checkpoints every 2 steps; prints the summary as JSON.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import folders_on_path  # noqa: F401 (every folder of test modules on sys.path)
from test_trainer import SyntheticBatches, base_config, synthetic_source

from sft_jax.loop import trainer


def main() -> None:
    model_dir, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = base_config(Path(model_dir), steps=steps, learning_rate=1e-3)
    config.eval.every_steps = 5
    config.checkpoint.enabled = True
    config.checkpoint.every_steps = 2
    config.checkpoint.keep_last = 3
    config.export.at_end = "best"

    def data_factory(_config, _feed):
        source = synthetic_source()
        source.train_batches = SyntheticBatches()
        return source

    summary = trainer.run(config, workdir, data_factory)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
