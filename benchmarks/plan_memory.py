"""XLA's planned memory of a train step (what the planner reads) against the process's measured
peak on CPU, one device, for a few model shapes.

  python benchmarks/plan_memory.py            # every shape, each in a fresh process

How it measures: the state and a batch are placed, then the kernel's peak resident set
(VmHWM) is reset (`echo 5 > /proc/self/clear_refs`, Linux) and the compiled step runs (its second
run: the first sets up thread pools and the runtime's own buffers once); the
step's own memory is VmHWM after it minus VmRSS before it (the arguments were resident already).
The prediction compared is XLA's plan without the arguments: temporaries + outputs - aliased.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SHAPES = {  # hidden, layers, seq, rows, vocab
    "small": (128, 2, 256, 8, 2048),
    "medium": (256, 4, 256, 8, 4096),
    "long": (256, 2, 1024, 4, 4096),
}


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(name: str) -> dict:
    import gc

    import jax
    import numpy as np
    import transformers
    from flax import nnx

    from configs import base
    from sft_jax import compile_plan
    from sft_jax.models import CausalLM
    from sft_jax.models.config import from_hf_config
    from sft_jax.optim import make_optimizer
    from sft_jax.sharding import device_batch, single_device_mesh
    from sft_jax.step import StepOptions

    hidden, layers, seq, rows, vocab = SHAPES[name]
    hf = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                  intermediate_size=3 * hidden, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=seq)  # fmt: skip
    config = base.get_config()
    model = CausalLM(from_hf_config(hf), dtype=jax.numpy.float32, param_dtype=jax.numpy.float32,
                     rngs=nnx.Rngs(0))  # fmt: skip
    mesh = single_device_mesh()
    tx, schedule = make_optimizer(config.train)
    state, shardings = compile_plan.init_state(model, tx, mesh)
    steps = compile_plan.build_steps(
        model, tx, schedule, mesh, shardings, train_rows=rows, eval_rows=rows, seq_len=seq,
        options=StepOptions(),
    )  # fmt: skip
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, (rows, seq))
    batch = device_batch({"input_ids": ids, "target_ids": ids, "target_mask": ids > 0,
                          "positions": np.tile(np.arange(seq), (rows, 1)),
                          "segment_ids": np.ones_like(ids)}, steps.batch_shardings)  # fmt: skip
    state, metrics = steps.train(state, batch)  # warm-up: thread pools, first-call buffers
    jax.block_until_ready((state, metrics))
    del metrics
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    state, metrics = steps.train(state, batch)
    jax.block_until_ready((state, metrics))
    peak = _kib("VmHWM")
    plan = steps.train_memory
    return {"shape": name, "predicted": plan.total - plan.arguments, "measured": peak - before,
            "arguments": plan.arguments}  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(measure(sys.argv[1])))
        sys.exit()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    for name in SHAPES:
        out = subprocess.run([sys.executable, __file__, name], env=env, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        result = json.loads(out.strip().splitlines()[-1])
        ratio = result["predicted"] / result["measured"]
        print(f"{name}: predicted {result['predicted'] / 2**20:.1f} MiB, measured "
              f"{result['measured'] / 2**20:.1f} MiB (predicted/measured {ratio:.3f})")  # fmt: skip
