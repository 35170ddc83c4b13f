"""XLA's planned memory of a train step (what the planner reads) against the process's measured
peak on CPU, for a few model shapes: full fine-tunes on one device, and LoRA steps compiled by
the planner itself (sft_jax.planning.estimate, from config.json alone) on 8 fake devices: an FSDP
mesh where the all-gathered frozen weights dominate, and a mixture of experts on fsdp x expert
with the grouped-matmul stand-in the planner compiles for it.

  python benchmarks/plan_memory.py               # every shape, each in a fresh process
  python benchmarks/plan_memory.py --only=small  # some of them (comma-separated)

How it measures: the state and a batch are placed, then the kernel's peak resident set
(VmHWM) is reset (`echo 5 > /proc/self/clear_refs`, Linux) and the compiled step runs (its second
run: the first sets up thread pools and the runtime's own buffers once); the
step's own memory is VmHWM after it minus VmRSS before it (the arguments were resident already).
The prediction compared is XLA's plan without the arguments: temporaries + outputs - aliased.
On 8 devices the process holds all 8: the measured figure is the step's own memory over 8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = {  # hidden, layers, seq, rows, vocab
    "small": (128, 2, 256, 8, 2048),
    "medium": (256, 4, 256, 8, 4096),
    "long": (256, 2, 1024, 4, 4096),
}
# Planned on 8 devices: (family, overrides of its tiny config, mesh, expert grouped matmul,
# tokens per row of an 8-row batch).
PLANNED = {
    "fsdp_lora": ("llama3.1", {"hidden_size": 256, "intermediate_size": 768,
                                "num_hidden_layers": 2, "head_dim": 64}, "1x8x1", "ragged_dot", 64),
    "moe_lora": ("qwen3_moe", {"num_experts": 32, "num_hidden_layers": 1, "mlp_only_layers": [],
                               "hidden_size": 256, "moe_intermediate_size": 256},
                 "1x2x4x1", "padded_blocks", 128),
}  # fmt: skip
DEVICES = 8


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _step_memory(run_step, state) -> tuple[int, int]:
    """(resident bytes before the step, its peak during): the second of two runs."""
    import gc

    import jax

    state = run_step(state)  # warm-up: thread pools, first-call buffers
    jax.block_until_ready(state)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _kib("VmRSS")
    jax.block_until_ready(run_step(state))
    return before, _kib("VmHWM")


def _concrete(abstract, rng):
    """Random arrays of the abstract tree's shapes, dtypes and shardings."""
    import jax
    import numpy as np

    def one(x):
        if x.dtype == np.bool_:
            value = np.ones(x.shape, bool)
        elif np.issubdtype(x.dtype, np.integer):
            value = rng.integers(1, 64, x.shape).astype(x.dtype)
        else:
            value = (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
        return jax.device_put(value, x.sharding)

    return jax.tree.map(one, abstract)


def measure_planned(name: str) -> dict:
    """A LoRA step compiled as the planner compiles it (abstract model from config.json) on 8
    devices, then run on random weights and a batch of token ids."""
    import tempfile

    import jax
    import numpy as np
    from hf_models import hf_config

    from configs import base
    from sft_jax.planning import estimate as plan_estimate
    from sft_jax.planning import search as plan_search
    from sft_jax.train import sharding
    from sft_jax.train.optim import make_optimizer

    family, overrides, mesh_text, experts, seq = PLANNED[name]
    config = base.get_config()
    config.model.name_or_path = tempfile.mkdtemp()
    hf_config(family, **overrides).save_pretrained(config.model.name_or_path)
    config.lora.rank, config.lora.target_modules = 8, "q_proj,k_proj,v_proj,o_proj"
    config.data.max_length, config.train.global_batch_size = seq, 8
    subject = plan_estimate.Subject(config, plan_estimate.model_config(config), experts=experts,
                                    extrapolate=False)  # fmt: skip
    candidate = plan_estimate.Candidate(*plan_search.parse_mesh(mesh_text, DEVICES), 1, "full")
    model, trainable = subject.model(subject.shape.num_layers)
    compiled, _ = plan_estimate.compile_candidate(config, model, trainable, candidate,
                                                  jax.devices())  # fmt: skip
    mesh = plan_estimate.candidate_mesh(candidate, jax.devices())
    tx, _ = make_optimizer(config.train)
    (state, _), (frozen, _) = plan_estimate._abstract_inputs(model, mesh, tx, trainable)
    rng = np.random.default_rng(0)
    state, frozen = _concrete(state, rng), _concrete(frozen, rng)
    batch = _concrete(sharding.abstract_batch(8, seq, mesh), rng)
    before, peak = _step_memory(lambda s: compiled(s, frozen, batch)[0], state)
    plan = plan_estimate.StepMemory.of(compiled)
    result = {"shape": name, "predicted": plan.total - plan.arguments,
              "measured": (peak - before) // DEVICES, "arguments": plan.arguments}  # fmt: skip
    if name == "fsdp_lora":  # what XLA:CPU's default (concurrency) scheduler plans instead
        with _default_scheduler():
            default, _ = plan_estimate.compile_candidate(config, model, trainable, candidate,
                                                         jax.devices())  # fmt: skip
        result["default_scheduler_temporaries"] = default.memory_analysis().temp_size_in_bytes
        result["temporaries"] = plan.temporaries
    return result


@contextlib.contextmanager
def _default_scheduler():
    from sft_jax.train import memory as memory_plan

    saved = dict(memory_plan.PLAN_COMPILER_OPTIONS)
    memory_plan.PLAN_COMPILER_OPTIONS.clear()
    try:
        yield
    finally:
        memory_plan.PLAN_COMPILER_OPTIONS.update(saved)


def measure(name: str) -> dict:
    import gc

    import jax
    import numpy as np
    import transformers
    from flax import nnx

    from configs import base
    from sft_jax.models import CausalLM
    from sft_jax.models.config import from_hf_config
    from sft_jax.train import compiled as compile_plan
    from sft_jax.train.optim import make_optimizer
    from sft_jax.train.sharding import device_batch, single_device_mesh
    from sft_jax.train.step import StepOptions

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


def environment(name: str) -> dict[str, str]:
    """The variables of a fresh process measuring `name` (8 fake devices for PLANNED)."""
    devices = f"--xla_force_host_platform_device_count={DEVICES}" if name in PLANNED else ""
    repo = Path(__file__).resolve().parents[1]  # configs/base.py
    tests = str(repo / "tests")  # hf_models' tiny configs
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(repo), tests) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": devices, "PYTHONPATH": path}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join((*SHAPES, *PLANNED)),
                        help=f"comma-separated, among {(*SHAPES, *PLANNED)}")  # fmt: skip
    parser.add_argument("name", nargs="?", default="", help=argparse.SUPPRESS)  # child: one shape
    args = parser.parse_args()
    if args.name:
        name = args.name
        print(json.dumps(measure_planned(name) if name in PLANNED else measure(name)))
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if not names or set(names) - {*SHAPES, *PLANNED}:
        parser.error(f"--only={args.only}: expected names among {(*SHAPES, *PLANNED)}")
    results = []
    for name in names:
        child = subprocess.run([sys.executable, __file__, name], env=environment(name),
                               capture_output=True, text=True)  # fmt: skip
        if child.returncode != 0:
            raise SystemExit(f"{name}: exit code {child.returncode}\n{child.stderr[-3000:]}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
        ratio = result["predicted"] / result["measured"]
        print(f"{name}: predicted {result['predicted'] / 2**20:.1f} MiB, measured "
              f"{result['measured'] / 2**20:.1f} MiB (predicted/measured {ratio:.3f})")  # fmt: skip
        results.append(result | {"ratio": ratio})
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
