#!/usr/bin/env bash
# The accelerator checks of the speed issue, in one command on one NVIDIA GPU (H100/H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the cuDNN attention kernel against float32 einsums (loss and gradients), on the GPU;
# 2. Llama-3.2-1B-shaped full fine-tuning, bf16 compute, seq 4096, packed rows of random tokens,
#    einsum and cuDNN attention, each against transformers + PyTorch (bf16, SDPA) in the same run;
# 3. Llama-3-8B-shaped LoRA (rank 16, every linear projection) at seq 4096: does it fit, MFU.
# Each step appends its output to OUT_DIR (default ./gpu_check) and the script goes on when one
# fails, so a partial run still reports what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

JAX_PLATFORMS=cuda XLA_FLAGS= python -m pytest -q -rs tests/test_attention.py 2>&1 \
  | tee "$out/attention_tests.txt"

for attention in xla cudnn; do
  python benchmarks/bench_train.py --shape=llama-1b --batch=4 --seq=4096 --dtype=bfloat16 \
    --remat=save_matmuls --attention="$attention" --steps=10 --mode=full 2>&1 \
    | tee "$out/llama1b_full_$attention.txt"
done

python benchmarks/bench_train.py --shape=llama-8b --batch=1 --seq=4096 --dtype=bfloat16 \
  --remat=full --attention=cudnn --steps=5 --mode=lora --lora_rank=16 --skip_torch 2>&1 \
  | tee "$out/llama8b_lora.txt"
