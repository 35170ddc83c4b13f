"""Training-step throughput and memory of sft_jax vs transformers + PyTorch: full, LoRA, QLoRA.

  python benchmarks/bench_train.py --shape=tiny --batch=2 --seq=256 --steps=3 --mode=full,lora,qlora
  python benchmarks/bench_train.py --shape=llama-1b --batch=4 --seq=4096 --dtype=bfloat16 \
      --mode=full,lora,qlora --lora_rank=16 --quantize=nf4  # GPU

Random weights (no download): transformers writes a random checkpoint of the shape to a temp
directory and both sides load it. sft_jax builds each model as the trainer does
(sft_jax.train.setup.build_model: from_pretrained, quantizing the decoder's kernels while
loading for QLoRA, then apply_lora) and runs its compiled train step on the trainable filter;
PyTorch runs loss.backward() + optimizer.step() with SDPA attention. Both use AdamW on the same
rows of random tokens (every position trained). sft_jax keeps --param_dtype parameters and computes
in --dtype; PyTorch keeps its parameters in --dtype on GPU, float32 on CPU. Modes:
  full   every parameter trained;
  lora   adapters of rank --lora_rank, alpha 16, no dropout, on every linear projection of the
         decoder (q, k, v, o, gate, up, down); PyTorch: peft.LoraConfig + get_peft_model, same;
  qlora  lora on a base whose linear kernels are stored --quantize=nf4|int8 (blocks of 64,
         double-quantized scales, as configs/base.py). PyTorch: bitsandbytes nf4 (also blocks
         of 64, double-quantized) when bitsandbytes and CUDA are present, else skipped; int8 is
         always skipped, since bitsandbytes' 8-bit is LLM.int8(), another method.

Each (side, mode) runs in a fresh child process: JAX's peak-memory counter cannot be reset, so
only a fresh process gives each mode its own peak; it also keeps JAX's preallocated GPU memory
away from PyTorch, and a mode that runs out of memory does not stop the others.

Reported per run: step time (mean of --steps after one warm-up step), tokens/s, MFU (when the
device's peak is known, see sft_jax.train.flops), peak device memory of the child (loading included;
n/a on CPU), XLA's planned memory of sft_jax's compiled train step per device ("plan"; known
before the step runs, on every backend), peak resident host memory of the child (on CPU
everything lives there), and measured bytes of the trainable parameters, the optimizer state and
the frozen variables (the base under LoRA: embedding, norms, and kernels, quantized under
QLoRA), plus the bytes per weight of the decoder's linear kernels. Then ratios, a table and one
JSON line.

MFU's model FLOPs per token, N = sft_jax.train.flops.matmul_params:
  full        6N + attention (sft_jax.train.flops.training_flops_per_token);
  lora/qlora  4N + attention + 6 x adapter parameters: the frozen base runs forward (2N) and
              the input-gradient half of backward (2N) but computes no weight gradients.
Dequantization and remat recomputation are not counted (the trainer's train/mfu uses the same
formula). --attention: as config.model.attention ("auto": cuDNN on NVIDIA GPUs, splash on TPUs,
einsums elsewhere; the table says which ran). Rows are full: one document of --seq tokens
each, as packing yields at its limit, with no padding, so that PyTorch's causal SDPA does the
same attention (sft_jax still runs its packing machinery: segment ids, cuDNN's segment table).
On CPU only ratios are meaningful; absolute figures belong to a GPU or TPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import transformers

from sft_jax.adapters.lora import PROJECTIONS
from sft_jax.core.spec import RunSpec
from sft_jax.models import ModelConfig, from_hf_config
from sft_jax.models.decoder import REMAT_POLICIES
from sft_jax.train.flops import PEAK_BF16_TFLOPS, matmul_params, training_flops_per_token
from sft_jax.train.kernel_choice import ATTENTION_CHOICES

REPO = Path(__file__).resolve().parents[1]  # configs/base.py lives there

SHAPES = {
    # The smallest that runs every mode (tests/test_benchmarks.py): kernels in blocks of 64.
    "micro": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256},
    # intermediate_size 704 (not 688 as before): QLoRA blocks of 64 must divide it.
    "tiny": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
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
MODES = ("full", "lora", "qlora")
LORA_ALPHA = 16.0  # configs/base.py's default; it scales updates, not time or memory
QUANT_BLOCK = 64  # configs/base.py's quant_block_size, and bitsandbytes' 4-bit block
RESULT_PREFIX = "RESULT "  # marks a child's result line on its stdout


def run_config(args: argparse.Namespace, mode: str, checkpoint: str) -> RunSpec:
    """configs/base.py with the fields that build the model and optimizer set, as a RunSpec."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from configs import base

    config = base.get_config()
    overrides = {
        "model": {"name_or_path": checkpoint, "param_dtype": args.param_dtype,
                  "compute_dtype": args.dtype, "remat": args.remat, "attention": args.attention},
        "data": {"max_length": args.seq, "packing": True, "max_documents_per_row": 1},
        "lora": {"rank": 0 if mode == "full" else args.lora_rank, "alpha": LORA_ALPHA,
                 "dropout": 0.0, "target_modules": "all-linear", "use_rslora": False,
                 "trainable_modules": "", "quantize": args.quantize if mode == "qlora" else "",
                 "quant_block_size": QUANT_BLOCK, "double_quant": True},
        "train": {"seed": 0, "steps": max(args.steps, 1), "learning_rate": 1e-5,
                  "warmup_steps": 0, "lr_schedule": "constant", "min_lr_ratio": 1.0,
                  "weight_decay": 0.0, "adam_b1": 0.9, "adam_b2": 0.95, "adam_eps": 1e-8,
                  "max_grad_norm": 1.0},
    }  # fmt: skip
    for section, fields in overrides.items():
        for name, value in fields.items():
            setattr(config[section], name, value)
    return RunSpec.of(config)


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


def write_checkpoint(hf_config: transformers.LlamaConfig, out_dir: str, dtype: str) -> None:
    """Random weights as a Hugging Face directory, stored in the compute dtype."""
    import torch

    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)


def model_flops_per_token(config: ModelConfig, seq: int, mode: str, trainable: int) -> float:
    """Model FLOPs per trained token, by the convention of the module docstring."""
    return training_flops_per_token(config, seq, None if mode == "full" else trainable)


# ---------------------------------------------------------------- sft_jax (child process)


def _tree_bytes(tree: Any) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _jax_linear_bytes_per_weight(model: Any) -> float:
    from sft_jax.models.decoder import decoder_linears
    from sft_jax.models.quantize import stored_bytes

    stored, weights = 0, 0
    for _, _, linear in decoder_linears(model):
        weights += linear.in_features * linear.out_features
        if linear.quant is None:
            stored += _tree_bytes(linear.kernel[...])
        else:
            stored += stored_bytes({k: v[...] for k, v in linear.quant.items()})
    return stored / weights


def time_sft_jax(args: argparse.Namespace, mode: str, checkpoint: str) -> dict:
    from sft_jax.models.decoder import use_attention
    from sft_jax.models.kernels.fused import packed_cudnn_supported
    from sft_jax.train import sharding
    from sft_jax.train.compiled import build_steps, init_state
    from sft_jax.train.flops import peak_flops_per_device
    from sft_jax.train.kernel_choice import attention_for
    from sft_jax.train.optim import make_optimizer
    from sft_jax.train.setup import build_model
    from sft_jax.train.sharding import device_batch
    from sft_jax.train.step import StepOptions

    config = run_config(args, mode, checkpoint)
    mesh = sharding.make_mesh(fsdp=-1)
    # Segments per row: one document (and a padding segment, were there any padding).
    segments = 2 if args.cudnn_layout == "packed" else 0
    model, _, trainable = build_model(config, mesh)
    use_attention(model, attention_for(config, model.config, segments)[0], segments)
    model.remat = config.model.remat
    # Sizes before the first step: the step donates (and so deletes) buffers the model shares.
    linear_bytes_per_weight = _jax_linear_bytes_per_weight(model)
    tx, schedule = make_optimizer(config.train)
    state, shardings = init_state(model, tx, mesh, trainable)
    compiled = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=args.batch, eval_rows=args.batch,
        seq_len=args.seq, options=StepOptions(loss_chunk_size=1024), trainable=trainable,
    )  # fmt: skip
    sizes = {
        "trainable_params": sum(int(x.size) for x in jax.tree.leaves(state["params"])),
        "trainable_bytes": _tree_bytes(state["params"]),
        "opt_state_bytes": _tree_bytes(state["opt_state"]),
        "frozen_bytes": _tree_bytes(compiled.frozen),
        "linear_bytes_per_weight": linear_bytes_per_weight,
    }
    batch = random_batch(args.batch, args.seq, model.config.vocab_size)
    device = device_batch(batch, compiled.batch_shardings)
    state, metrics = compiled.train(state, device)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled.train(state, device)
    jax.block_until_ready(metrics)
    stats = jax.local_devices()[0].memory_stats() or {}
    packed = model.config.attention == "cudnn" and packed_cudnn_supported()
    return {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "devices": jax.device_count(),
        "attention": model.config.attention + (" (packed layout)" if packed else ""),
        "peak_flops": peak_flops_per_device(),
        "step_s": (time.perf_counter() - start) / args.steps,
        "compile_s": compiled.compile_seconds,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        # XLA's plan for the compiled train step (state, batch, activations), per device.
        "planned_bytes": compiled.train_memory.total if compiled.train_memory else None,
        "loss": float(metrics["train/loss"]),
        **sizes,
    }


# ---------------------------------------------------------------- PyTorch (child process)


def torch_qlora_skip_reason(quantize: str) -> str | None:
    """Why PyTorch cannot run the same QLoRA here, or None when it can."""
    if quantize != "nf4":
        return (
            f"bitsandbytes has no block-wise {quantize} (its 8-bit is LLM.int8(), another method)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    import torch

    if not torch.cuda.is_available():
        return "bitsandbytes 4-bit needs CUDA, and there is none"
    return None


def _torch_model(args: argparse.Namespace, mode: str, checkpoint: str, device: str) -> Any:
    import peft
    import torch

    dtype = torch.float32 if device == "cpu" else getattr(torch, args.dtype)
    options: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": dtype}
    if mode == "qlora":
        options["device_map"] = {"": 0}
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, **options)
    if mode != "qlora":
        model = model.to(device)
    if mode != "full":
        config = peft.LoraConfig(
            r=args.lora_rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
            target_modules=list(PROJECTIONS), bias="none", task_type="CAUSAL_LM",
        )  # fmt: skip
        model = peft.get_peft_model(model, config)
    return model.train()


def _torch_linear_bytes_per_weight(model: Any) -> float:
    """Bytes per weight of the decoder's projections (bitsandbytes' scales not counted)."""
    stored, weights = 0, 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            weight = getattr(module, "base_layer", module).weight
            weights += module.in_features * module.out_features
            stored += weight.numel() * weight.element_size()
    return stored / weights


def time_torch(args: argparse.Namespace, mode: str, checkpoint: str) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _torch_model(args, mode, checkpoint, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    batch = random_batch(args.batch, args.seq, model.config.vocab_size)
    input_ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    labels = torch.as_tensor(batch["target_ids"], dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        logits = model(input_ids=input_ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    step()  # warm-up; also creates the optimizer state
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    frozen = [p for p in model.parameters() if not p.requires_grad]
    opt_tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {
        "device": f"{name} x1",
        "devices": 1,
        "peak_flops": next(
            (t * 1e12 for k, t in PEAK_BF16_TFLOPS.items() if k.lower() in name.lower()), 0.0
        ),
        "step_s": seconds,
        "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "loss": float(loss),
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "opt_state_bytes": sum(t.numel() * t.element_size() for t in opt_tensors),
        "frozen_bytes": sum(p.numel() * p.element_size() for p in frozen),
        "linear_bytes_per_weight": _torch_linear_bytes_per_weight(model),
    }


# ---------------------------------------------------------------- parent: run and report


def run_child(side: str, mode: str, checkpoint: str) -> dict:
    """One (side, mode) in a fresh process, with the same flags; its result or its error."""
    command = [sys.executable, __file__, *sys.argv[1:], f"--worker={side}", f"--mode={mode}"]
    command.append(f"--checkpoint={checkpoint}")
    child = subprocess.run(command, capture_output=True, text=True)
    results = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode == 0 and results:
        return {"side": side, "mode": mode, **json.loads(results[-1][len(RESULT_PREFIX) :])}
    tail = "\n".join(child.stderr.splitlines()[-15:])
    print(f"{side} {mode}: child failed with exit code {child.returncode}:\n{tail}")
    return {"side": side, "mode": mode, "error": f"exit code {child.returncode}"}


def with_rates(result: dict, config: ModelConfig, seq: int, tokens: int) -> dict:
    """Adds tokens/s, model FLOPs per token and MFU to a finished run."""
    if "step_s" not in result:
        return result
    flops = model_flops_per_token(config, seq, result["mode"], result["trainable_params"])
    tokens_per_s = tokens / result["step_s"]
    peak = result["peak_flops"] * result["devices"]
    mfu = tokens_per_s * flops / peak if peak else None
    return result | {"tokens_per_s": tokens_per_s, "flops_per_token": flops, "mfu": mfu}


def _progress(result: dict) -> str:
    if "step_s" not in result:
        return result.get("skipped") or result["error"]
    compile_s = result.get("compile_s")
    return f"{result['step_s'] * 1000:.1f} ms/step" + (
        f" (compile {compile_s:.1f} s)" if compile_s else ""
    )


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def print_table(results: list[dict]) -> None:
    columns = ("side", "mode", "step ms", "tokens/s", "GFLOP/tok", "MFU", "peak GiB", "plan GiB",
               "host GiB", "train MiB", "opt MiB", "frozen MiB", "B/weight", "loss")  # fmt: skip
    print(f"{columns[0]:<8} {columns[1]:<6}" + "".join(f" {c:>10}" for c in columns[2:]))
    for r in results:
        head = f"{r['side']:<8} {r['mode']:<6}"
        if "step_s" not in r:
            print(f"{head} {r.get('skipped') or r.get('error')}")
            continue
        cells = (
            _fmt(r["step_s"], ".1f", 1e-3), _fmt(r["tokens_per_s"], ",.0f"),
            _fmt(r["flops_per_token"], ".3f", 1e9), _fmt(r["mfu"], ".1%"),
            _fmt(r["peak_bytes"], ".2f", 2**30), _fmt(r.get("planned_bytes"), ".2f", 2**30),
            _fmt(r.get("host_peak_bytes"), ".2f", 2**30),
            _fmt(r["trainable_bytes"], ".2f", 2**20),
            _fmt(r["opt_state_bytes"], ".2f", 2**20), _fmt(r["frozen_bytes"], ".2f", 2**20),
            _fmt(r["linear_bytes_per_weight"], ".3f"), _fmt(r["loss"], ".4f"),
        )  # fmt: skip
        print(head + "".join(f" {c:>10}" for c in cells))


# What the adapter modes are compared with full fine-tuning on, per side.
VERSUS_FULL = {
    "tokens/s": lambda r: r["tokens_per_s"],
    "trainable+opt state bytes": lambda r: r["trainable_bytes"] + r["opt_state_bytes"],
    "all weights+opt state bytes": lambda r: (
        r["trainable_bytes"] + r["opt_state_bytes"] + r["frozen_bytes"]
    ),
    "peak memory": lambda r: r["peak_bytes"],
    "peak host memory": lambda r: r.get("host_peak_bytes"),
}


def ratios(results: list[dict]) -> dict[str, float]:
    """sft_jax / torch tokens/s per mode; each adapter mode / full, per side."""
    done = {(r["side"], r["mode"]): r for r in results if "step_s" in r}
    out = {}
    for (side, mode), r in done.items():
        theirs, full = done.get(("torch", mode)), done.get((side, "full"))
        if side == "sft_jax" and theirs:
            out[f"{mode} tokens/s sft_jax / torch"] = r["tokens_per_s"] / theirs["tokens_per_s"]
        for name, figure in VERSUS_FULL.items() if mode != "full" and full else ():
            if figure(r) and figure(full):
                out[f"{side} {mode} / full {name}"] = figure(r) / figure(full)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--param_dtype", default="float32", choices=["float32", "bfloat16"],
        help="sft_jax's parameter storage (a frozen LoRA base is usually bfloat16)",
    )  # fmt: skip
    parser.add_argument("--remat", default="none", choices=sorted(REMAT_POLICIES))
    parser.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES)
    parser.add_argument(
        "--cudnn_layout", default="packed", choices=["packed", "mask"],
        help="how cuDNN keeps documents apart: a segment table (Hopper GPUs), or a [B,1,T,S] mask",
    )  # fmt: skip
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--mode", default="full", help=f"comma-separated, among {MODES}")
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--quantize", default="nf4", choices=["nf4", "int8"])
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # child: sft_jax|torch
    parser.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)  # child: model dir
    args = parser.parse_args()
    if args.worker:
        timer = time_sft_jax if args.worker == "sft_jax" else time_torch
        result = timer(args, args.mode, args.checkpoint)
        # Peak resident host memory of this child (KiB on Linux): on CPU the parameters, optimizer
        # state and activations live there, so it stands in for the device peak.
        result["host_peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(RESULT_PREFIX + json.dumps(result))
        return
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--mode={args.mode}: expected a comma-separated list among {MODES}")
    if args.lora_rank < 1:
        parser.error(f"--lora_rank={args.lora_rank}: expected a rank of at least 1")

    hf_config = transformers.LlamaConfig(
        **SHAPES[args.shape], max_position_embeddings=max(args.seq, 2048)
    )
    config = from_hf_config(hf_config)
    results = []
    with tempfile.TemporaryDirectory() as checkpoint:
        write_checkpoint(hf_config, checkpoint, args.dtype)
        for mode in modes:
            for side in ["sft_jax"] if args.skip_torch else ["sft_jax", "torch"]:
                skip = (side, mode) == ("torch", "qlora") and torch_qlora_skip_reason(args.quantize)
                result = (
                    {"side": side, "mode": mode, "skipped": f"reference skipped: {skip}"}
                    if skip
                    else run_child(side, mode, checkpoint)
                )
                results.append(with_rates(result, config, args.seq, args.batch * args.seq))
                print(f"done: {side} {mode}, {_progress(results[-1])}", flush=True)
    report(args, config, results)


def _attention_ran(args: argparse.Namespace, results: list[dict]) -> str:
    ran = sorted({r["attention"] for r in results if "attention" in r})
    return f"{args.attention} -> {', '.join(ran)}" if ran else args.attention


def report(args: argparse.Namespace, config: ModelConfig, results: list[dict]) -> None:
    devices = sorted({f"{r['side']}: {r['device']}" for r in results if "device" in r})
    print(f"\n{'; '.join(devices)}")
    setup = [
        f"shape {args.shape} (N = {matmul_params(config) / 1e6:.1f}M matmul params), batch "
        f"{args.batch} x seq {args.seq}, {args.dtype} compute, {args.param_dtype} params "
        "(sft_jax; LoRA adapters float32), "
        f"remat {args.remat}, attention {_attention_ran(args, results)} (sft_jax)"
    ]
    modes = {r["mode"] for r in results}
    if modes & {"lora", "qlora"}:
        setup.append(
            f"LoRA rank {args.lora_rank}, alpha {LORA_ALPHA:g}, no dropout, on "
            f"{','.join(PROJECTIONS)}"
        )
    if "qlora" in modes:
        setup.append(f"QLoRA {args.quantize}, blocks of {QUANT_BLOCK}, double-quantized scales")
    print("; ".join(setup))
    print(
        "MFU counts model FLOPs per token: full 6N + attention; lora/qlora 4N + attention + "
        "6 x adapter params (frozen base: forward and input gradients, no weight gradients); "
        "dequantization and remat not counted. B/weight: bytes per weight of the decoder's "
        "linear kernels."
    )
    print_table(results)
    figures = ratios(results)
    for name, value in figures.items():
        print(f"{name}: {value:.3f}x")
    flags = {k: v for k, v in vars(args).items() if k not in ("worker", "checkpoint")}
    print(json.dumps({"args": flags, "results": results, "ratios": figures}))


if __name__ == "__main__":
    main()
