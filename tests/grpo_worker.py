"""An online RL run in its own process, for the kill -9 test of tests/loop/test_grpo_run.py.

  python tests/grpo_worker.py MODEL_DIR DATA_DIR WORKDIR STEPS NUM_ITERATIONS
The GRPO config of test_grpo_run.grpo_config, checkpoints every 2 updates (saved in the
background, as by default); prints the summary as JSON.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import folders_on_path  # noqa: F401 (every folder of test modules on sys.path)
from test_grpo_run import grpo_config

from sft_jax.loop import trainer
from sft_jax.train.setup import open_run_data


def main() -> None:
    model_dir, data_dir, workdir = (Path(a) for a in sys.argv[1:4])
    steps, num_iterations = int(sys.argv[4]), int(sys.argv[5])
    config = grpo_config(model_dir, data_dir, steps=steps, num_iterations=num_iterations)
    config.train.lr_schedule = "constant"
    config.checkpoint.enabled = True
    config.checkpoint.every_steps = 2
    config.checkpoint.keep_last = 3
    summary = trainer.run(config, workdir, data_factory=open_run_data)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    main()
