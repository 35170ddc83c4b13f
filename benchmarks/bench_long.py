"""Long-context memory: XLA's plan of the compiled train step's per-device memory with the
sequence split over mesh.context = 1, 2, 4, 8 (fake CPU devices, no weights allocated), and the
packing time of long-context data at two sizes.

  python benchmarks/bench_long.py                        # T = 16k, small model, context 1-8
  python benchmarks/bench_long.py --attention=blockwise  # one kernel (default: xla,blockwise)
  python benchmarks/bench_long.py --packing              # best_fit time at N and 4N documents
  python benchmarks/bench_long.py --delta_rule           # Gated DeltaNet vs attention, 4k-32k

Measured (--delta_rule, 2 heads of 128, float32, forward + backward, a loaded 2-core CPU): the
chunked delta rule needs 4.2x / 16.4x / 32.8x less XLA temporary memory than full causal
attention at T = 4k / 16k / 32k (0.09 / 0.37 / 0.74 GiB against 0.38 / 6.0 / 24.1 GiB) and is
4.8x faster at 4k (0.63 s against 3.0 s; attention not run beyond 4k). Its time grows no faster
than linearly (1.6 s at 16k, 2.4 s at 32k).

Each context size compiles the train step on its own C devices (data = fsdp = tensor = 1, one
row), so parameters and optimizer state are the same on every device and what falls with C is
the activations: XLA's `temp` bytes (memory_analysis of the compiled step). The einsum
attention path ("xla") holds scores of [heads, T / C, T] per layer: they fall as 1 / C too,
but a fused kernel never holds them, nor does the blockwise kernel (models/blockwise.py),
whose scores are one [heads, block, block] tile at a time. The presets' per-device memory
comes from the planner (python -m sft_jax.plan; the command is in each preset's docstring).

On a GPU, tokens/s and peak memory at seq 32k with a ~1B model, with and without offload:

  python benchmarks/bench_train.py --shape=llama-1b --batch=1 --seq=32768 --dtype=bfloat16 \
      --param_dtype=bfloat16 --mode=full --remat=full --skip_torch
  python benchmarks/bench_train.py --shape=llama-1b --batch=1 --seq=32768 --dtype=bfloat16 \
      --param_dtype=bfloat16 --mode=full --remat=offload --skip_torch

(not measured for this change: no GPU was lent to it).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # fake devices must be asked for before jax starts
    flags = os.environ.get("XLA_FLAGS", "")
    if "host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from configs import base
from sft_jax.data.batches import best_fit
from sft_jax.models import deltanet
from sft_jax.models.config import from_hf_config
from sft_jax.planning.estimate import abstract_run_model
from sft_jax.train import sharding
from sft_jax.train.compiled import lower_train_step
from sft_jax.train.memory import StepMemory
from sft_jax.train.optim import make_optimizer
from sft_jax.train.step import StepOptions, StepSpec

GIB = 2.0**30


def small_model(args: argparse.Namespace) -> transformers.PretrainedConfig:
    return transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq,
    )  # fmt: skip


def _abstract_state(model, mesh, tx, trainable) -> tuple[tuple, tuple]:
    """((state, shardings), (frozen, shardings)) as ShapeDtypeStructs: nothing allocated."""
    params = sharding.abstract_params(model, mesh, trainable)
    shardings = sharding.param_shardings(model, mesh, trainable)
    opt_state = jax.eval_shape(tx.init, params)
    opt_shardings = sharding.opt_state_shardings(opt_state, shardings, mesh)
    step = NamedSharding(mesh, PartitionSpec())
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=step), "params": params,
             "opt_state": sharding.with_shardings(opt_state, opt_shardings)}  # fmt: skip
    state_shardings = {"step": step, "params": shardings, "opt_state": opt_shardings}
    frozen = nnx.Not(trainable)
    return (state, state_shardings), (
        sharding.abstract_params(model, mesh, frozen),
        sharding.param_shardings(model, mesh, frozen),
    )


def compiled_memory(hf, seq: int, rows: int, mesh_sizes: dict, remat: str, dtype: str,
                    lora_rank: int = 0, attention: str = "xla") -> StepMemory:  # fmt: skip
    """XLA's per-device memory plan of the train step on a mesh of `mesh_sizes`."""
    config = base.get_config()
    config.model.param_dtype = config.model.compute_dtype = dtype
    config.lora.rank = lora_rank
    model, trainable = abstract_run_model(config, from_hf_config(hf), attention)
    model.remat = remat
    devices = jax.devices()[: int(np.prod(list(mesh_sizes.values())))]
    sizes = {"data": 1, "fsdp": 1, "tensor": 1} | mesh_sizes
    mesh = sharding.make_mesh(devices=devices, **sizes)
    tx, schedule = make_optimizer(config.train)
    objective = StepOptions(loss_chunk_size=config.train.loss_chunk_size).objective()
    spec = StepSpec(nnx.split(model, trainable, ...)[0], tx, schedule, objective)
    state, frozen = _abstract_state(model, mesh, tx, trainable)
    with jax.set_mesh(mesh):
        compiled = lower_train_step(spec, mesh, state, frozen, rows=rows, seq_len=seq).compile()
    return StepMemory.of(compiled)


def context_table(args: argparse.Namespace) -> list[dict]:
    print(f"seq {args.seq}, hidden {args.hidden}, layers {args.layers}, vocab {args.vocab}, "
          f"1 row, remat {args.remat}, {args.dtype}; XLA's plan per device (GiB)")  # fmt: skip
    print("| attention | context | arguments | temporaries | total | temporaries vs context=1 |")
    print("|---|---|---|---|---|---|")
    rows = []
    for attention in args.attention:
        first = None
        for context in args.contexts:
            plan = compiled_memory(small_model(args), args.seq, 1, {"context": context},
                                   args.remat, args.dtype, attention=attention)  # fmt: skip
            first = first or plan.temporaries
            ratio = f"{plan.temporaries / first:.3f} (1/C = {1 / context:.3f})"
            print(f"| {attention} | {context} | {plan.arguments / GIB:.3f} | "
                  f"{plan.temporaries / GIB:.3f} | {plan.total / GIB:.3f} | {ratio} |",
                  flush=True)  # fmt: skip
            rows.append({"attention": attention, "context": context,
                         "arguments": plan.arguments, "temporaries": plan.temporaries,
                         "total": plan.total})  # fmt: skip
    return rows


def _grad_of_sum(mixer, inputs: list[jax.Array]):
    """The compiled gradient of sum(mixer(q, k, v, ...)) w.r.t. q, k and v."""
    grad = jax.jit(jax.grad(lambda *xs: jnp.sum(mixer(*xs)), argnums=(0, 1, 2)))
    return grad.lower(*inputs).compile()


def _causal_attention(q, k, v):
    scores = jnp.einsum("BTHE,BSHE->BHTS", q, k) / np.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((1, 1, q.shape[1], q.shape[1]), bool))
    return jnp.einsum("BHTS,BSHE->BTHE", jax.nn.softmax(jnp.where(causal, scores, -1e30)), v)


def delta_rule_table(args: argparse.Namespace) -> list[dict]:
    """Forward + backward of one layer's token mixer: the Gated DeltaNet's chunked delta rule
    (models/deltanet.py) against full causal attention (einsums) with the same heads, float32
    on this CPU: XLA's temporaries and seconds per call (attention run only where its [H, T, T]
    scores take at most 1 GiB)."""
    heads, dim = args.delta_heads, args.delta_dim
    print(f"delta rule vs full attention, one layer, {heads} heads of {dim}, float32, CPU")
    print("| T | delta temp GiB | attention temp GiB | attention / delta memory | delta s | "
          "attention s | attention / delta time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    rows = []
    for seq in args.delta_seqs:
        keys = jax.random.split(jax.random.key(0), 5)
        q, k, v = (jax.random.normal(key, (1, seq, heads, dim)) for key in keys[:3])
        g = -0.1 * jax.random.uniform(keys[3], (1, seq, heads))
        beta = jax.random.uniform(keys[4], (1, seq, heads))
        starts = jnp.zeros((1, seq), bool).at[:, 0].set(True)

        def delta(q, k, v, g=g, beta=beta, starts=starts):
            state = jnp.zeros((1, heads, dim, dim))
            return deltanet.chunked_delta_rule(q, k, v, g, beta, starts, state)[0]

        row = {"seq": seq}
        for name, mixer in (("delta", delta), ("attention", _causal_attention)):
            compiled = _grad_of_sum(mixer, [q, k, v])
            row[f"{name}_temp"] = compiled.memory_analysis().temp_size_in_bytes
            row[f"{name}_seconds"] = None
            if name == "delta" or heads * seq * seq * 4 <= GIB:
                jax.block_until_ready(compiled(q, k, v))  # warm
                start = time.perf_counter()
                jax.block_until_ready(compiled(q, k, v))
                row[f"{name}_seconds"] = time.perf_counter() - start
        delta_s, attention_s = row["delta_seconds"], row["attention_seconds"]
        ran = attention_s is not None
        print(f"| {seq} | {row['delta_temp'] / GIB:.3f} | {row['attention_temp'] / GIB:.3f} | "
              f"{row['attention_temp'] / row['delta_temp']:.1f} | {delta_s:.3f} | "
              f"{f'{attention_s:.3f}' if ran else 'not run'} | "
              f"{f'{attention_s / delta_s:.2f}' if ran else 'not run'} |", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def packing_times(args: argparse.Namespace) -> dict:
    """best_fit's time for N and 4N documents of long-tailed lengths into 131072-token rows."""
    rng = np.random.default_rng(0)
    times = []
    for count in (args.documents, 4 * args.documents):
        lengths = np.minimum(rng.lognormal(8.0, 1.5, count).astype(np.int64) + 1, 131072)
        start = time.perf_counter()
        rows = best_fit(lengths, rng.permutation(count), 131072)
        times.append(time.perf_counter() - start)
        fill = lengths.sum() / (len(rows) * 131072)
        print(f"{count} documents -> {len(rows)} rows of 131072 (fill {fill:.3f}): "
              f"{times[-1]:.3f} s")  # fmt: skip
    print(f"4x the documents: {times[1] / times[0]:.2f}x the time (linear: 4x)")
    return {"documents": args.documents, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--contexts", type=lambda s: [int(c) for c in s.split(",")],
                        default=[1, 2, 4, 8])  # fmt: skip
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--attention", type=lambda s: s.split(","), default=["xla", "blockwise"],
                        help="attention kernels to compare: xla (einsums), blockwise")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--packing", action="store_true", help="time packing instead")
    parser.add_argument("--documents", type=int, default=50000)
    parser.add_argument("--delta_seqs", type=lambda s: [int(c) for c in s.split(",")],
                        default=[4096, 16384, 32768])  # fmt: skip
    parser.add_argument("--delta_heads", type=int, default=2)
    parser.add_argument("--delta_dim", type=int, default=128)
    parser.add_argument("--delta_rule", action="store_true",
                        help="compare the delta rule with full attention instead")  # fmt: skip
    args = parser.parse_args()
    if args.packing:
        print(json.dumps({"packing": packing_times(args)}))
    elif args.delta_rule:
        print(json.dumps({"delta_rule": delta_rule_table(args)}))
    else:
        print(json.dumps({"plans": context_table(args)}))


if __name__ == "__main__":
    main()
