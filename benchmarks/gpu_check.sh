#!/usr/bin/env bash
# The accelerator checks of the speed issue, in one command on one NVIDIA GPU (H100/H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Most important first, each step under its own time limit, so that a run cut short still
# reports what matters most:
# 1. Llama-3.2-1B-shaped full fine-tuning, bf16 compute, seq 4096, full rows, attention "auto"
#    (cuDNN, with its segment table on Hopper), against transformers + PyTorch (bf16, SDPA) in
#    the same run: MFU, tokens/s ratio, compile time, peak memory;
# 2. the cuDNN kernel (segment table and mask forms) against float32 einsums, loss and
#    gradients, on the GPU (tests/test_attention.py);
# 3. Llama-3-8B-shaped LoRA (rank 16, every linear projection) at seq 4096: does it fit, MFU;
# 4. the same 1B step with cuDNN's mask form and with einsum attention (no PyTorch rerun).
# Each step's output goes to OUT_DIR (default ./gpu_check); the script goes on when one fails.
#
# The lent GPU machines lack ml_collections and tensorboardX; fetch their wheels here first
# (.whl/ is git-ignored) and carry it along (device run: carry [".whl"]):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     ml_collections==1.1.0 tensorboardX==2.6.5
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sft_jax from this checkout
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
bench=(python benchmarks/bench_train.py --dtype=bfloat16 --steps=10)
llama1b=(--shape=llama-1b --batch=4 --seq=4096 --remat=save_matmuls --mode=full)

timeout 330 "${bench[@]}" "${llama1b[@]}" --attention=auto 2>&1 | tee "$out/llama1b_auto.txt"

JAX_PLATFORMS=cuda XLA_FLAGS= timeout 180 python -m pytest -q -rs -x tests/test_attention.py \
  -k "cudnn or segment" 2>&1 | tee "$out/attention_tests.txt"

timeout 300 "${bench[@]}" --shape=llama-8b --batch=1 --seq=4096 --remat=full --steps=5 \
  --mode=lora --lora_rank=16 --attention=auto --skip_torch 2>&1 | tee "$out/llama8b_lora.txt"

timeout 200 "${bench[@]}" "${llama1b[@]}" --attention=cudnn --max_documents_per_row=0 \
  --skip_torch 2>&1 | tee "$out/llama1b_cudnn_mask.txt"
timeout 200 "${bench[@]}" "${llama1b[@]}" --attention=xla --skip_torch 2>&1 \
  | tee "$out/llama1b_xla.txt"
