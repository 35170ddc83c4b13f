"""Full fine-tuning of Qwen2.5-0.5B-Instruct on UltraChat (downloads model and data from the hub).

Sized for one 80 GB GPU or one TPU host (raise gradient_accumulation_steps on smaller ones;
attention "auto" picks the fused kernel: cuDNN on NVIDIA GPUs, splash on TPUs):
  python main.py --config=configs/qwen2_5_0_5b_full.py --workdir=/tmp/qwen2_5_0_5b_sft
Plan it before a GPU is rented (XLA's memory per device, no weights read; not yet run for this
preset, so no planner figure is quoted here):
  python -m sft_jax.plan --config=configs/qwen2_5_0_5b_full.py --devices=1 --device_memory=80GB
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    config.model.compute_dtype = "bfloat16"  # fp32 master weights, bf16 matmuls
    config.model.remat = "save_matmuls"
    config.data.train_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.train_split = "train_sft"
    config.data.eval_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.eval_split = "test_sft"
    config.data.eval_max_examples = 2000
    config.data.max_length = 2048
    config.train.steps = 3000
    config.train.global_batch_size = 32
    config.train.gradient_accumulation_steps = 4  # micro-batches of 8 rows
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 100
    config.train.weight_decay = 0.0
    config.train.loss_chunk_size = 512  # [8, 512, 151936] fp32 logits at a time: 2.5 GB
    config.eval.every_steps = 250
    config.eval.global_batch_size = 32
    config.eval.early_stopping_patience = 4
    # Open-ended chat has no single right answer: show a few replies, skip exact match.
    config.eval.generate_examples = 0
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 500
    return config
