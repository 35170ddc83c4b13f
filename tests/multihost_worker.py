"""One process of a multi-process training test: feeds its share of each global batch.

  python tests/multihost_worker.py MODEL_DIR WORKDIR PROCESS_ID NUM_PROCESSES PORT
Prints {"losses": [...], "eval_loss": x} as its last line.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_step import SEQ_LEN, synthetic_batch
from test_trainer import SyntheticBatches, base_config

from sft_jax import distributed, trainer
from sft_jax.models import from_pretrained


def local_rows(batch: dict, process_id: int, processes: int) -> dict:
    rows = batch["input_ids"].shape[0] // processes
    return {k: v[process_id * rows : (process_id + 1) * rows] for k, v in batch.items()}


def main() -> None:
    model_dir, workdir, process_id, processes, port = sys.argv[1:]
    process_id, processes = int(process_id), int(processes)
    config = base_config(Path(model_dir), steps=4)
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
    from sft_jax import sharding

    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    run = trainer.Trainer(config, Path(workdir), from_pretrained(model_dir, mesh=mesh), source)
    losses = []
    run.writer.write = lambda step, values: (
        losses.append(values["train/loss"]) if "train/loss" in values else None
    )
    summary = run.train()
    print(json.dumps({"losses": losses, "eval_loss": summary["final_eval"]["eval/loss"]}))


if __name__ == "__main__":
    main()
