"""LoRA (r=16, attention projections) on Qwen3-30B-A3B, a mixture of 128 experts (8 active per
token, 3.3B of 30.5B parameters active), with UltraChat.

Mesh: one host of 8 GPUs (80 GB) as fsdp=2 x expert=4: each device holds 32 of the 128
experts of every layer, halved again by fsdp. The planner (XLA's memory plan of the train
step compiled from config.json on 8 fake CPU devices with XLA:CPU's memory-optimized
scheduler, cuDNN attention planned with the blockwise stand-in, the experts' ragged_dot with
the grouped-matmul stand-in of models/kernels/grouped_matmul.py, bf16 read back from an f32
compile, 2 and 4 layers extrapolated to 48; about 63 s of CPU time) predicts 65.3 GiB per device
for this mesh with 1 micro-batch: it fits 80 GB. An upper bound still (XLA:CPU starts some
layers' backward all-gathers early; docs/planning.md); the stand-in's plan equals its measured
peak on a small MoE (tests/planning/test_plan.py).
  python -m sft_jax.plan --config=configs/qwen3_30b_a3b_lora.py --devices=8 \
    --device_memory=80GB --model_config=assets/model_configs/qwen3_30b_a3b \
    --meshes=1x2x4x1 --accumulation=1
The log prints XLA's plan of the compiled step and warns before the first step if it exceeds
the device.
  python main.py --config=configs/qwen3_30b_a3b_lora.py --workdir=/tmp/qwen3_30b_a3b_lora
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "Qwen/Qwen3-30B-A3B"
    config.model.param_dtype = "bfloat16"  # the frozen base in bf16; adapters stay fp32
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.mesh.fsdp = 2
    config.mesh.expert = 4
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.target_modules = "q_proj,k_proj,v_proj,o_proj"  # experts and router frozen
    config.data.train_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.train_split = "train_sft"
    config.data.eval_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.eval_split = "test_sft"
    config.data.eval_max_examples = 2000
    config.data.max_length = 4096
    config.train.steps = 1000
    config.train.global_batch_size = 16
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    config.train.router_aux_loss_coef = 0.001  # the checkpoint's value, spelled out
    config.eval.every_steps = 250
    config.eval.global_batch_size = 16
    config.eval.generate_examples = 0  # open-ended replies: samples only, no exact match
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 250
    return config
