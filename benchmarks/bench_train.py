"""Training-step throughput of sft_jax vs transformers + PyTorch on the same model and batch.

  python benchmarks/bench_train.py --shape=tiny --batch=4 --seq=512 [--steps=5]
  python benchmarks/bench_train.py --shape=llama-1b --batch=4 --seq=4096 --dtype=bfloat16  # GPU

Random weights (no download). Both sides run full fine-tuning with AdamW on the same rows of
random tokens (every position trained), sft_jax through its compiled train step, PyTorch
through loss.backward() + optimizer.step() with SDPA attention. Reports step time, tokens/s,
MFU (when the device's peak is known, see sft_jax.metrics) and peak device memory, then the
tokens/s ratio. On CPU only the ratio is meaningful; absolute figures belong to a GPU or TPU.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from sft_jax import sharding
from sft_jax.metrics import peak_flops_per_device, training_flops_per_token
from sft_jax.models import CausalLM, from_hf_config
from sft_jax.optim import make_optimizer
from sft_jax.step import StepOptions, build_steps, device_batch, init_state

SHAPES = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 8192},
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "tie_word_embeddings": True},
    "llama-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip


def train_config(steps: int):
    import ml_collections

    return ml_collections.ConfigDict(
        {"steps": steps, "learning_rate": 1e-5, "warmup_steps": 0, "lr_schedule": "constant",
         "min_lr_ratio": 1.0, "weight_decay": 0.0, "adam_b1": 0.9, "adam_b2": 0.95,
         "adam_eps": 1e-8, "max_grad_norm": 1.0}
    )  # fmt: skip


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    return {
        "input_ids": tokens[:, :-1],
        "target_ids": tokens[:, 1:],
        "target_mask": np.ones((batch, seq), bool),
        "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
        "segment_ids": np.ones((batch, seq), np.int32),
    }


def _peak_device_bytes() -> int | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_sft_jax(hf_config, batch: dict, dtype: str, steps: int, remat: str) -> dict:
    config = from_hf_config(hf_config)
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    model = CausalLM(config, dtype=compute, param_dtype=jnp.float32, remat=remat, rngs=nnx.Rngs(0))
    mesh = sharding.make_mesh(fsdp=-1)
    tx, schedule = make_optimizer(train_config(steps))
    state, shardings = init_state(model, tx, mesh)
    rows, seq = batch["input_ids"].shape
    compiled = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=rows, eval_rows=rows, seq_len=seq,
        options=StepOptions(loss_chunk_size=1024),
    )  # fmt: skip
    device = device_batch(batch, compiled.batch_shardings)
    state, metrics = compiled.train(state, device)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled.train(state, device)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return {
        "step_s": seconds,
        "compile_s": compiled.compile_seconds,
        "peak_bytes": _peak_device_bytes(),
        "loss": float(metrics["train/loss"]),
    }


def time_torch(hf_config, batch: dict, dtype: str, steps: int) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
    model = model.to(device=device, dtype=torch.float32 if device == "cpu" else torch_dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    input_ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    labels = torch.as_tensor(batch["target_ids"], dtype=torch.long, device=device)

    def step() -> float:
        logits = model(input_ids=input_ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"step_s": seconds, "peak_bytes": peak, "loss": float(loss)}


def _row(name: str, result: dict, tokens: int, flops_per_token: float, peak_flops: float) -> str:
    tokens_per_s = tokens / result["step_s"]
    mfu = (
        f"{tokens_per_s * flops_per_token / peak_flops / jax.device_count():6.1%}"
        if peak_flops
        else "   n/a"
    )
    memory = f"{result['peak_bytes'] / 2**30:8.2f}" if result.get("peak_bytes") else "     n/a"
    return f"{name:<14} {result['step_s'] * 1000:10.1f} {tokens_per_s:12,.0f} {mfu:>7} {memory:>9}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--remat", default="none")
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()

    hf_config = transformers.LlamaConfig(
        **SHAPES[args.shape], max_position_embeddings=max(args.seq, 2048)
    )
    batch = random_batch(args.batch, args.seq, hf_config.vocab_size)
    tokens = args.batch * args.seq
    flops_per_token = training_flops_per_token(from_hf_config(hf_config), args.seq)
    peak = peak_flops_per_device()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; shape {args.shape}, "
          f"batch {args.batch} x seq {args.seq}, {args.dtype}, remat {args.remat}; "
          f"{flops_per_token / 1e9:.2f} GFLOP/token")  # fmt: skip
    print(f"{'':<14} {'step ms':>10} {'tokens/s':>12} {'MFU':>7} {'peak GiB':>9}")
    ours = time_sft_jax(hf_config, batch, args.dtype, args.steps, args.remat)
    print(
        _row("sft_jax", ours, tokens, flops_per_token, peak), f"(compile {ours['compile_s']:.1f} s)"
    )
    if not args.skip_torch:
        theirs = time_torch(hf_config, batch, args.dtype, args.steps)
        print(_row("torch+HF", theirs, tokens, flops_per_token, peak))
        print(f"tokens/s ratio sft_jax / torch: {theirs['step_s'] / ours['step_s']:.2f}x")


if __name__ == "__main__":
    main()
