#!/usr/bin/env bash
# Run sft_jax on every worker of a Cloud TPU VM pod slice (the same command on each worker).
#
#   scripts/launch_tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x.y=value ...]
#   e.g. scripts/launch_tpu_pod.sh my-v5p-64 us-east5-a configs/llama3_1_8b_lora.py /mnt/shared/run1
#
# Each worker runs `python main.py` itself; jax.distributed.initialize() finds the other
# workers through the TPU metadata, every process feeds its share of each global batch and the
# mesh spans all chips. WORKDIR must be one directory that every worker sees (an NFS or
# Filestore mount, or a GCS bucket mounted with gcsfuse): checkpoints are written to it by all
# workers together, metrics by worker 0. Re-running the same command resumes from the newest
# checkpoint, e.g. after a preemption.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,12p' "$0"
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo_url=${SFT_JAX_REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")}
if [ -z "$repo_url" ]; then
  echo "set SFT_JAX_REPO to a git URL the workers can clone" >&2
  exit 2
fi
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  [ -d sft_jax ] || git clone -q $repo_url sft_jax
  cd sft_jax && git pull -q --ff-only || true
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  python main.py --config=$config --workdir=$workdir --config.distributed.force=True $extra
"
