"""A training run on a streamed two-source mixture, for the resume and multi-process tests.

  python tests/stream_worker.py MODEL_DIR DATA_DIR WORKDIR STEPS PROCESS_ID PROCESSES PORT
Trains on DATA_DIR/{math,chat}.jsonl (weights 3:1, eval files beside them) with
config.data.loader="stream", checkpoints every 2 steps when PROCESSES is 1. Saves the input ids
of this process's rows of each step to WORKDIR/batches.npy and prints the summary, with the
documents this process read, as JSON.
"""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import folders_on_path  # noqa: F401 (every folder of test modules on sys.path)
from test_trainer import base_config

from sft_jax.loop import trainer
from sft_jax.train.setup import open_run_data


def main() -> None:
    model_dir, data_dir, workdir, steps, process_id, processes, port = sys.argv[1:]
    data_dir, process_id, processes = Path(data_dir), int(process_id), int(processes)
    config = base_config(Path(model_dir), steps=int(steps), learning_rate=1e-3)
    if processes > 1:
        config.distributed.update(coordinator_address=f"127.0.0.1:{port}", process_id=process_id,
                                  num_processes=processes, cpu_collectives="gloo")  # fmt: skip
    config.data.update(loader="stream", stream_window=16, max_length=64, num_workers=1,
                       cache_dir=str(data_dir / f"cache{process_id}"), eval_files="")  # fmt: skip
    config.data.mixture = [
        {"name": name, "weight": weight, "train_files": str(data_dir / f"{name}.jsonl"),
         "eval_files": str(data_dir / f"{name}_eval.jsonl")}
        for name, weight in (("math", 3), ("chat", 1))
    ]  # fmt: skip
    config.eval.update(every_steps=0, at_start=False)  # one eval, at the end: fewer seconds
    config.checkpoint.update(enabled=processes == 1, every_steps=2, keep_last=3)
    recorded = {}

    def data_factory(config, feed):
        source = open_run_data(config, feed)
        source.train_batches = recorded["loader"] = Recorded(source.train_batches)
        return source

    Path(workdir).mkdir(parents=True, exist_ok=True)  # only process 0 makes it in a run
    summary = trainer.run(config, Path(workdir), data_factory)
    loader = recorded["loader"]
    np.save(Path(workdir) / "batches.npy", np.stack(loader.batches))
    final_eval = {k: v for k, v in summary.get("final_eval", {}).items() if k.endswith("loss")}
    print(json.dumps({"start_step": summary["start_step"], "end_step": summary["end_step"],
                      "documents_read": loader.loader.documents.read,
                      "final_eval": final_eval}))  # fmt: skip


class Recorded:
    """The loader, keeping the input ids of every batch it makes (in order; prefetch included)."""

    def __init__(self, loader):
        self.loader, self.batches = loader, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loader)
        self.batches.append(batch["input_ids"])
        return batch

    def get_state(self):
        return self.loader.get_state()

    def set_state(self, state):
        self.loader.set_state(state)


if __name__ == "__main__":
    main()
