"""LoRA (r=16 on every linear layer) on Gemma 4 E2B (the text model of google/gemma-4-E2B-it:
35 layers, 4 sliding-window layers of 512 to 1 full-attention layer, per-layer input embeddings,
the last 20 layers reusing earlier layers' keys and values, the double-wide MLP), with
UltraChat.

Sized for one 80 GB GPU (micro-batches of 8 rows of 4096 tokens). Plan it first (XLA's memory
per device from config.json alone; assets/model_configs/gemma4_e2b holds the E2B text config as
two public copies agree on it, filled with transformers' Gemma4TextConfig defaults). The planner
(bf16 read back from an f32 compile; all 35 layers compiled, since the last 20 share keys and
values and have double-wide MLPs; cuDNN attention planned with the blockwise stand-in; 9 min of
CPU time) predicts 31.7 GiB per device at 2 micro-batches: it fits 80 GB (one micro-batch of 16
rows: 565 GiB):
  python -m sft_jax.plan --config=configs/gemma4_e2b_lora.py --devices=1 --device_memory=80GB \
    --model_config=assets/model_configs/gemma4_e2b
  python main.py --config=configs/gemma4_e2b_lora.py --workdir=/tmp/gemma4_e2b_lora
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "google/gemma-4-E2B-it"  # the multimodal checkpoint: its text model
    config.model.param_dtype = "bfloat16"  # the frozen base in bf16; adapters stay fp32
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.target_modules = "all-linear"
    config.data.train_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.train_split = "train_sft"
    config.data.eval_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.eval_split = "test_sft"
    config.data.eval_max_examples = 2000
    config.data.max_length = 4096
    config.train.steps = 1000
    config.train.global_batch_size = 16
    config.train.gradient_accumulation_steps = 2
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    config.eval.every_steps = 250
    config.eval.global_batch_size = 4
    config.eval.generate_examples = 0  # open-ended replies: samples only, no exact match
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 250
    return config
