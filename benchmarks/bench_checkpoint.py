"""Save and restore times of a ~1 GB train state, and what an async save costs the training.

  python benchmarks/bench_checkpoint.py [--dir=/tmp/sft_jax_bench_ckpts] [--steps=8]

The state is a Llama-shaped model (random, fp32) with its AdamW moments: 3 x parameters.
'async save' runs `steps` train steps twice, once plain and once with a save started before
the first; the overhead is the extra wall time of the second run (the save included until it
completes, so that nothing is hidden behind the end of the measurement). On a CPU-only host the
save's serialization competes with the step for the same cores; on GPU/TPU the step runs on
the device while host threads write.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
import transformers
from bench_train import random_batch, run_config
from flax import nnx

from sft_jax.models import CausalLM, from_hf_config
from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import abstract_like, device_batch
from sft_jax.train.step import StepOptions
from sft_jax.workdir.checkpointing import Checkpoints


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/sft_jax_bench_ckpts")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    # The trainer config of a full fine-tuning run (the optimizer's fields; saved as run meta).
    config = run_config(
        argparse.Namespace(dtype="float32", param_dtype="float32", remat="none",
                           attention="xla", lora_rank=1, quantize="", steps=args.steps,
                           seq=args.seq),
        "full", "",
    )  # fmt: skip
    hf = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,  # 2816 at the default 1024
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 64, 1),
        num_key_value_heads=max(args.hidden // 256, 1),
        vocab_size=args.vocab,
    )
    model = CausalLM(from_hf_config(hf), rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(fsdp=-1)
    tx, schedule = make_optimizer(config.train)
    state, shardings = init_state(model, tx, mesh)
    rows, seq = 2 * jax.device_count(), args.seq
    steps = build_steps(model, tx, schedule, mesh, shardings, train_rows=rows, eval_rows=rows,
                        seq_len=seq, options=StepOptions())  # fmt: skip
    batch = device_batch(random_batch(rows, seq, hf.vocab_size), steps.batch_shardings)
    size = state_bytes(state)
    print(
        f"state: {size / 1e9:.2f} GB on {jax.device_count()} {jax.devices()[0].platform} device(s)"
    )

    def run_steps(state, save_first: Checkpoints | None):
        start = time.perf_counter()
        if save_first is not None:
            save_first.save(10_000, state, {}, config)
        for _ in range(args.steps):
            state, metrics = steps.train(state, batch)
        jax.block_until_ready(metrics)
        if save_first is not None:
            save_first.wait()
        return state, time.perf_counter() - start

    state, _ = run_steps(state, None)  # warm-up
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    sync = Checkpoints(root / "sync", keep_last=1, async_save=False)
    start = time.perf_counter()
    sync.save(1, state, {}, config)
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    restored, _, _ = sync.restore(1, abstract_like(state))
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - start
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
    )

    state, plain_s = run_steps(state, None)
    state, with_save_s = run_steps(state, Checkpoints(root / "async", keep_last=1, async_save=True))
    print(f"blocking save:   {save_s:6.2f} s  ({size / 1e9 / save_s:.2f} GB/s)")
    print(f"restore:         {restore_s:6.2f} s  ({size / 1e9 / restore_s:.2f} GB/s)")
    print(
        f"{args.steps} steps:        {plain_s:6.2f} s plain, {with_save_s:.2f} s with an async save"
    )
    extra = with_save_s - plain_s
    print(
        f"async save cost: {extra / plain_s:6.1%} of {args.steps} steps' time, "
        f"{extra / save_s:.0%} of a blocking save"
    )
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"state_bytes": size, "save_s": save_s, "restore_s": restore_s,
                      "steps": args.steps, "plain_s": plain_s, "with_async_save_s": with_save_s,
                      "async_overhead": extra / plain_s}))  # fmt: skip


if __name__ == "__main__":
    main()
