"""QLoRA (NF4 base, r=32 adapters) on Qwen3-1.7B with Capybara multi-turn chats.

Sized for one 24 GB GPU (micro-batches of 2 rows of 4096 tokens); on a TPU host of 8 chips add
--config.train.gradient_accumulation_steps=2 --config.eval.global_batch_size=8 (rows must split
over the chips). Attention "auto" picks cuDNN (NVIDIA) or splash (TPU) fused kernels:
  python main.py --config=configs/qwen3_1_7b_qlora.py --workdir=/tmp/qwen3_1_7b_qlora
Plan it before a GPU is rented (XLA's memory per device, no weights read; not yet run for this
preset, so no planner figure is quoted here):
  python -m sft_jax.plan --config=configs/qwen3_1_7b_qlora.py --devices=1 --device_memory=24GB
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "Qwen/Qwen3-1.7B"
    config.model.param_dtype = "bfloat16"
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.lora.rank = 32
    config.lora.alpha = 64.0
    config.lora.quantize = "nf4"
    config.data.train_files = "hf:trl-lib/Capybara"
    config.data.train_split = "train"
    config.data.eval_files = "hf:trl-lib/Capybara"
    config.data.eval_split = "test"
    # Qwen3's template renders an earlier reply differently once a later turn follows (it drops
    # the <think> block): each such reply is trained in a document of its own, rendered as at
    # inference (data/spans.py), so every reply trains.
    config.data.train_on = "all_assistant"
    config.data.max_length = 4096
    config.train.steps = 1000
    config.train.global_batch_size = 16
    config.train.gradient_accumulation_steps = 8
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 30
    config.train.weight_decay = 0.0
    config.eval.every_steps = 100
    config.eval.global_batch_size = 4
    config.eval.generate_examples = 0  # open-ended replies: samples only, no exact match
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 200
    return config
