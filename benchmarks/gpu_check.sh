#!/usr/bin/env bash
# The accelerator checks of the speed issue on one NVIDIA GPU (H100/H200):
#   bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]      (default: every step, in this order)
# Steps, most important first:
#   llama1b  Llama-3.2-1B-shaped full fine-tuning, bf16 compute, seq 4096, full rows, attention
#            "auto" (cuDNN, with its segment table on Hopper), against transformers + PyTorch
#            (bf16, SDPA) in the same run: MFU, tokens/s ratio, compile time, peak memory;
#   tests    the cuDNN kernel (segment-table and mask forms) against float32 einsums, loss and
#            gradients, on the GPU (tests/models/test_attention.py);
#   llama8b  Llama-3-8B-shaped LoRA (rank 16, every linear projection; bf16 base, fp32 adapters,
#            as configs/llama3_1_8b_lora.py) at seq 4096: does it fit, MFU;
#   variants the 1B step without remat (fits in 80 GB; no recomputation), with cuDNN's mask
#            form and with einsum attention (no PyTorch rerun);
#   vlm      image-text training steps (Gemma 3 and Qwen2.5-VL, "medium" shape: 448-pixel
#            images, bf16 compute) against transformers + PyTorch in the same process:
#            images/s and tokens/s ratios (benchmarks/bench_vlm.py).
# Each step writes OUT_DIR/STEP*.txt and has its own time limit; all of them together stop at
# GPU_CHECK_SECONDS (default 540), so a device call with a 600 s limit always returns what
# finished. A step that fails does not stop the others.
#
# The lent GPU machines lack ml_collections and tensorboardX; fetch their wheels here first
# (.whl/ is git-ignored) and carry it along (device run: carry [".whl"]):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     ml_collections==1.1.0 tensorboardX==2.6.5
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
shift || true
steps=("$@")
((${#steps[@]})) || steps=(llama1b tests llama8b variants vlm)
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # sft_jax from this checkout
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))

# timed LIMIT LOG COMMAND...: runs COMMAND for at most LIMIT seconds (less when the deadline is
# nearer), its output to the terminal and LOG.
timed() {
  local limit=$1 log=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < 30)); then
    echo "skipped: $log (out of time)" | tee "$log"
    return
  fi
  timeout $((limit < left ? limit : left)) "$@" 2>&1 | tee "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
bench=(python benchmarks/bench_train.py --dtype=bfloat16 --steps=10)
llama1b=(--shape=llama-1b --batch=4 --seq=4096 --remat=save_matmuls --mode=full)
for step in "${steps[@]}"; do
  case "$step" in
    llama1b) timed 300 "$out/llama1b_auto.txt" "${bench[@]}" "${llama1b[@]}" --attention=auto ;;
    tests)
      JAX_PLATFORMS=cuda XLA_FLAGS= timed 180 "$out/attention_tests.txt" \
        python -m pytest -q -rs tests/models/test_attention.py -k "cudnn_kernel" ;;
    llama8b)
      timed 300 "$out/llama8b_lora.txt" "${bench[@]}" --shape=llama-8b --batch=1 --seq=4096 \
        --param_dtype=bfloat16 --remat=full --steps=5 --mode=lora --lora_rank=16 \
        --attention=auto --skip_torch ;;
    variants)
      timed 150 "$out/llama1b_no_remat.txt" "${bench[@]}" "${llama1b[@]}" --remat=none \
        --attention=auto --skip_torch
      timed 150 "$out/llama1b_cudnn_mask.txt" "${bench[@]}" "${llama1b[@]}" --attention=cudnn \
        --cudnn_layout=mask --skip_torch
      timed 150 "$out/llama1b_xla.txt" "${bench[@]}" "${llama1b[@]}" --attention=xla \
        --skip_torch ;;
    vlm)
      timed 300 "$out/vlm.txt" python benchmarks/bench_vlm.py --shape=medium --batch=8 \
        --images=2 --text=512 --dtype=bfloat16 --steps=10 --warmup=2 ;;
    *) echo "unknown step $step: expected llama1b, tests, llama8b, variants or vlm" >&2 ;;
  esac
done
