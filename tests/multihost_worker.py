"""One process of a multi-process training test: feeds its share of each global batch.

  python tests/multihost_worker.py MODEL_DIR WORKDIR PROCESS_ID NUM_PROCESSES PORT
Prints {"losses": [...], "eval_loss": x, "end_step": n, "interrupted": b} as its last line.
Environment: WORKER_STEPS (default 4) steps to train; WORKER_SIGTERM="P:S" makes process P
send itself SIGTERM once step S's metrics are logged.
"""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import folders_on_path  # noqa: F401 (every folder of test modules on sys.path)
from test_step import SEQ_LEN, synthetic_batch
from test_trainer import SyntheticBatches, base_config

from sft_jax.core.spec import RunSpec
from sft_jax.loop import trainer
from sft_jax.models import from_pretrained
from sft_jax.train import distributed


def local_rows(batch: dict, process_id: int, processes: int) -> dict:
    rows = batch["input_ids"].shape[0] // processes
    return {k: v[process_id * rows : (process_id + 1) * rows] for k, v in batch.items()}


def main() -> None:
    model_dir, workdir, process_id, processes, port = sys.argv[1:]
    process_id, processes = int(process_id), int(processes)
    config = base_config(Path(model_dir), steps=int(os.environ.get("WORKER_STEPS", "4")))
    if processes > 1:
        config.distributed.coordinator_address = f"127.0.0.1:{port}"
        config.distributed.num_processes = processes
        config.distributed.process_id = process_id
        config.distributed.cpu_collectives = "gloo"
    distributed.initialize(config.distributed)
    config.eval.at_start = False
    config.eval.every_steps = 4
    source = trainer.DataSource(
        train_batches=SyntheticBatches(lambda batch: local_rows(batch, process_id, processes)),
        eval_batches=lambda: [
            local_rows(synthetic_batch(s), process_id, processes) for s in (100, 101)
        ],
        seq_len=SEQ_LEN,
    )
    from sft_jax.train import sharding

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    model = from_pretrained(model_dir, mesh=mesh)
    run = trainer.Trainer(RunSpec.of(config), Path(workdir), model, source)
    losses = []
    signal_process, signal_step = (
        int(x) for x in os.environ.get("WORKER_SIGTERM", "-1:-1").split(":")
    )

    def write(step: int, values: dict) -> None:
        if "train/loss" in values:
            losses.append(values["train/loss"])
        if (process_id, step) == (signal_process, signal_step):
            os.kill(os.getpid(), signal.SIGTERM)

    run.writer.write = write
    summary = run.train()
    final_eval = summary.get("final_eval") or {}
    print(
        json.dumps(
            {
                "losses": losses,
                "eval_loss": final_eval.get("eval/loss"),
                "end_step": summary["end_step"],
                "interrupted": summary["interrupted"],
            }
        )
    )


if __name__ == "__main__":
    main()
