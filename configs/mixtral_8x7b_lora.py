"""LoRA (r=16, attention projections) on Mixtral-8x7B-Instruct-v0.1, 8 experts (2 active per
token, 12.9B of 46.7B parameters active), with Alpaca: the recipe of configs/llama3_1_8b_lora.py
with what differs.

Mesh: one host of 8 GPUs (80 GB) as fsdp=1 x expert=8: one expert of every layer per device.
The planner (XLA's memory plan of the train step compiled from config.json on 8 fake CPU
devices with XLA:CPU's memory-optimized scheduler, the cuDNN attention planned with the
blockwise stand-in, bf16 read back from an f32 compile, 2 and 4 layers extrapolated to 32; about
45 s of CPU time) predicts 44.0 GiB per device for
this mesh and 1 micro-batch: it fits 80 GB. With one expert per device the grouped-matmul
stand-in is ragged_dot itself (XLA:CPU's single dense product: memory a kernel's, FLOPs up to 8x
over, so the planned step time overstates). An upper bound still (docs/planning.md).
  python -m sft_jax.plan --config=configs/mixtral_8x7b_lora.py --devices=8 \
    --device_memory=80GB --model_config=assets/model_configs/mixtral_8x7b --meshes=1x1x8x1 \
    --accumulation=1
  python main.py --config=configs/mixtral_8x7b_lora.py --workdir=/tmp/mixtral_8x7b_lora
"""

from configs import llama3_1_8b_lora


def get_config():
    config = llama3_1_8b_lora.get_config()
    config.model.name_or_path = "mistralai/Mixtral-8x7B-Instruct-v0.1"
    config.mesh.fsdp = 1
    config.mesh.expert = 8
    config.lora.target_modules = "q_proj,k_proj,v_proj,o_proj"  # experts and router frozen
    config.train.gradient_accumulation_steps = 1
    config.eval.global_batch_size = 16
    config.eval.early_stopping_patience = 0
    return config
