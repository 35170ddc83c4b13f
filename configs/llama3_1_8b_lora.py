"""LoRA (r=16, every linear layer) on Llama-3.1-8B-Instruct with Alpaca (gated model: log in
to the hub with access to meta-llama first).

Run on one 80 GB GPU, or a TPU host (the base is sharded over every local device with fsdp):
  python main.py --config=configs/llama3_1_8b_lora.py --workdir=/tmp/llama3_1_8b_lora
On one host of 8 GPUs of 80 GB the planner (XLA's memory plan compiled from config.json on 8
fake CPU devices with XLA:CPU's memory-optimized scheduler, cuDNN attention planned with the
blockwise stand-in, bf16 read back from an f32 compile, 2 and 4 layers extrapolated to 32; about
136 s of CPU time) recommends fsdp=8 with 2
micro-batches: 19.6 GiB per device (fsdp=4 x tensor=2: 37.8 GiB; data=2 x fsdp=4: 26.7 GiB).
Still an upper bound: XLA:CPU starts some layers' backward all-gathers early (docs/planning.md); by
arithmetic the step needs about 2 GiB of weights per device plus a few GiB of activations:
  python -m sft_jax.plan --config=configs/llama3_1_8b_lora.py --devices=8 --device_memory=80GB \
    --peak_tflops=989 --interconnect_gbps=450 --model_config=assets/model_configs/llama3_1_8b \
    --meshes=1x8x1,1x4x2,2x4x1 --accumulation=2
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    config.model.param_dtype = "bfloat16"  # the frozen base in bf16; adapters stay fp32
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.dropout = 0.05
    config.data.train_files = "hf:yahma/alpaca-cleaned"
    config.data.eval_files = ""
    config.data.eval_fraction = 0.02
    config.data.max_length = 2048
    config.train.steps = 1500
    config.train.global_batch_size = 16
    config.train.gradient_accumulation_steps = 2
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    config.train.loss_chunk_size = 512
    config.eval.every_steps = 250
    config.eval.global_batch_size = 8
    config.eval.generate_examples = 0  # open-ended replies: samples only, no exact match
    config.eval.max_new_tokens = 128
    config.eval.early_stopping_patience = 3
    config.checkpoint.every_steps = 250
    return config
