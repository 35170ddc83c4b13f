"""Load time and peak host memory of from_pretrained on a generated ~1 GB checkpoint.

  python benchmarks/bench_load.py [--out=/tmp/bench_ckpt] [--layers=8] [--devices=1,8]

Writes a random bf16 checkpoint shaped like TinyLlama-1.1B with fewer layers (no download),
then loads it in a fresh process per device count and reports wall time and peak resident
memory above the process's baseline, as a multiple of the checkpoint size. On CPU the loaded
parameters themselves live in host memory, so 1.0x is the floor; a loader that held a second
full copy would show 2x or more. What remains above 1.0x is transient, per tensor (the largest
tensor's share is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def make_checkpoint(
    out: Path, layers: int, hidden: int = 2048, vocab: int = 32000
) -> tuple[int, int]:
    """A Llama-style config and random bf16 weights written tensor by tensor.

    Returns the checkpoint's bytes and its largest tensor's bytes.
    """
    import ml_dtypes
    import transformers

    from sft_jax.models.io import safetensors as safetensors_io

    heads = max(hidden // 64, 1)  # TinyLlama's at the defaults: 32 heads of 64, 4 of them KV
    kv_heads = max(heads // 8, 1)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    d, f, v, kv = hidden, hidden * 11 // 4, vocab, kv_heads * (hidden // heads)
    shapes = {
        "model.embed_tokens.weight": (v, d),
        "lm_head.weight": (v, d),
        "model.norm.weight": (d,),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (d, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, d),
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
        }
    rng = np.random.default_rng(0)
    tensors = [
        safetensors_io.PendingTensor(
            name,
            shape,
            np.dtype(ml_dtypes.bfloat16),
            lambda s=shape: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16),
        )
        for name, shape in shapes.items()
    ]
    safetensors_io.write_checkpoint(out, tensors, max_shard_bytes=400 * 1024**2)
    return sum(t.nbytes for t in tensors), max(t.nbytes for t in tensors)


def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process image. Not ru_maxrss: Linux carries that
    over from the parent across fork and exec, which would count the checkpoint writer."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(path: str, devices: int) -> dict:
    """Runs inside the child process: load onto an fsdp mesh over `devices` CPU devices."""
    import jax
    import jax.numpy as jnp
    import transformers

    from sft_jax.models import from_pretrained
    from sft_jax.train import sharding

    # Backend up and transformers' lazy imports (torch, when installed) done before the
    # baseline, so that the figure measures the loader, not library imports.
    jnp.ones(8).block_until_ready()
    transformers.AutoConfig.from_pretrained(path)
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    mesh = sharding.make_mesh(fsdp=devices, devices=jax.devices()[:devices])
    model = from_pretrained(path, mesh=mesh, param_dtype=jnp.bfloat16)
    jax.block_until_ready(model.embed[...])
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"devices": devices, "load_s": seconds, "peak_above_baseline": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/sft_jax_bench_ckpt")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--devices", default="1,8")
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.out, int(args.child))))
        return
    size, largest = make_checkpoint(Path(args.out), args.layers, args.hidden, args.vocab)
    print(f"checkpoint: {args.out}, {size / 1e9:.2f} GB bf16, largest tensor {largest / size:.1%}")
    print(f"{'devices':>8} {'load s':>8} {'GB/s':>6} {'peak host mem / ckpt':>22}")
    results = []
    for devices in [int(d) for d in args.devices.split(",")]:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        env["JAX_PLATFORMS"] = "cpu"
        child = [sys.executable, __file__, f"--out={args.out}", f"--child={devices}"]
        result = json.loads(
            subprocess.run(
                child, env=env, check=True, capture_output=True, text=True
            ).stdout.splitlines()[-1]
        )
        print(
            f"{devices:>8} {result['load_s']:>8.2f} {size / 1e9 / result['load_s']:>6.2f} "
            f"{result['peak_above_baseline'] / size:>21.2f}x"
        )
        results.append(result)
    print(json.dumps({"checkpoint_bytes": size, "loads": results}))


if __name__ == "__main__":
    main()
