"""Full fine-tuning of Qwen2.5-0.5B-Instruct on UltraChat (downloads model and data from the hub).

Run on one GPU or one TPU host:
  python main.py --config=configs/qwen2_5_0_5b_full.py --workdir=/tmp/qwen2_5_0_5b_sft
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
    config.train.learning_rate = 1e-5
    config.train.warmup_steps = 100
    config.train.weight_decay = 0.0
    config.train.loss_chunk_size = 1024
    config.eval.every_steps = 250
    config.eval.global_batch_size = 32
    config.eval.early_stopping_patience = 4
    config.checkpoint.every_steps = 500
    return config
