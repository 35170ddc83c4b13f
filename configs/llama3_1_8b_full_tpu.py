"""Full fine-tune of Llama-3.1-8B-Instruct on a TPU v5p slice of 64 chips (95 GB HBM, 459 bf16
TFLOP/s each): the recipe of configs/llama3_1_8b_lora.py with what differs (no adapters, float32
master weights and Adam state sharded over the slice, a lower learning rate, a larger batch).

The planner (no TPU, no weights; about 77 s of CPU time, with XLA:CPU's memory-optimized
scheduler; the table is in docs/planning.md) recommends fsdp=32 x tensor=2: 10 GiB per device,
260 ms per step by its roofline (fsdp=64: 21 GiB, 408 ms):
  python -m sft_jax.plan --config=configs/llama3_1_8b_full_tpu.py --devices=64 \\
    --accelerator=tpu --device_memory=95GB --peak_tflops=459 --interconnect_gbps=300 \\
    --model_config=assets/model_configs/llama3_1_8b --meshes=1x64x1,1x32x2,2x32x1 --accumulation=1
Run on the slice (every host runs the same command):
  python main.py --config=configs/llama3_1_8b_full_tpu.py --config.mesh.tensor=2 \\
    --workdir=gs://BUCKET/llama3_1_8b_full
"""

from configs import llama3_1_8b_lora


def get_config():
    config = llama3_1_8b_lora.get_config()
    config.model.param_dtype = "float32"  # master weights in f32, matmuls in bf16
    config.lora.rank = 0  # full fine-tuning
    config.lora.dropout = 0.0
    config.train.global_batch_size = 64
    config.train.gradient_accumulation_steps = 1
    config.train.learning_rate = 1e-5
    config.train.weight_decay = 0.01
    config.eval.global_batch_size = 64
    return config
