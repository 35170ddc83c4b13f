"""LoRA (r=16, the latent attention's projections) on Moonlight-16B-A3B-Instruct, a DeepSeek-V3
architecture (model_type deepseek_v3: multi-head latent attention, 64 routed experts of which
6 are active per token plus 2 shared, sigmoid routing with a frozen score-correction bias, one
dense first layer; about 2.2B of 16B parameters active), with UltraChat.

Mesh: one host of 8 GPUs (80 GB) as fsdp=2 x expert=4: each device holds 16 of the 64 experts
of every layer, halved again by fsdp. Attention runs the einsum path (latent attention has no
fused kernel here), so remat is full. The planner (XLA's memory plan of the whole 27-layer step
compiled on 8 fake CPU devices, about 3.5 minutes of CPU time) predicts 24 GiB per device for
this mesh with 1 micro-batch: it fits 80 GB.
  python -m sft_jax.plan --config=configs/moonlight_16b_a3b_lora.py --devices=8 \\
    --device_memory=80GB --model_config=assets/model_configs/moonlight_16b_a3b \\
    --meshes=1x2x4x1 --accumulation=1
Moonlight's tokenizer is tiktoken code loaded with trust_remote_code, which sft_jax refuses:
point config.data.tokenizer at a directory holding a converted fast tokenizer
(tokenizer.json) of the same vocabulary before running
  python main.py --config=configs/moonlight_16b_a3b_lora.py --workdir=/tmp/moonlight_lora
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "moonshotai/Moonlight-16B-A3B-Instruct"
    config.model.param_dtype = "bfloat16"  # the frozen base in bf16; adapters stay fp32
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.model.attention = "xla"  # latent attention: the einsum path
    config.mesh.fsdp = 2
    config.mesh.expert = 4
    config.lora.rank = 16
    config.lora.alpha = 32.0
    # Experts, router and its correction bias frozen.
    config.lora.target_modules = "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"
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
    config.eval.every_steps = 250
    config.eval.global_batch_size = 16
    config.eval.generate_examples = 0  # open-ended replies: samples only, no exact match
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 250
    return config
