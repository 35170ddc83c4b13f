"""One process of the multi-process context test: the loss and gradients of
test_context_parallel's packed batch with the mesh's context axis spanning every process.

  python tests/context_worker.py MODEL_DIR PROCESS_ID NUM_PROCESSES PORT OUT.npz
Process 0 writes the loss and every gradient (keyed by path) to OUT.npz.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import folders_on_path  # noqa: F401 (every folder of test modules on sys.path)
import jax
import ml_collections
import numpy as np
from test_context_parallel import loss_and_grads, tiny_model

from sft_jax.train import distributed, sharding


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    model_dir, process_id, processes, port, out = sys.argv[1:]
    distributed.initialize(ml_collections.ConfigDict({
        "coordinator_address": f"127.0.0.1:{port}", "num_processes": int(processes),
        "process_id": int(process_id), "cpu_collectives": "gloo", "force": False,
    }))  # fmt: skip
    mesh = sharding.make_mesh(1, 1, 1, context=jax.device_count())
    loss, grads = loss_and_grads(tiny_model(model_dir, mesh), mesh)
    if jax.process_index() == 0:
        flat = jax.tree_util.tree_flatten_with_path(grads)[0]
        arrays = {jax.tree_util.keystr(path): np.asarray(g) for path, g in flat}
        np.savez(out, loss=np.asarray(loss), **arrays)


if __name__ == "__main__":
    main()
