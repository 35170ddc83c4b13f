"""Full fine-tuning of Gemma-2-2B-it on No Robots (gated model: accept Gemma's terms on the hub).

Gemma's template has no system role: examples with a system message are counted and skipped.
Run on one GPU or TPU host:
  python main.py --config=configs/gemma2_2b.py --workdir=/tmp/gemma2_2b_sft
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "google/gemma-2-2b-it"
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "save_matmuls"
    config.data.train_files = "hf:HuggingFaceH4/no_robots"
    config.data.train_split = "train"
    config.data.eval_files = "hf:HuggingFaceH4/no_robots"
    config.data.eval_split = "test"
    config.data.skip_bad_examples = True
    config.data.max_length = 2048
    config.train.steps = 1000
    config.train.global_batch_size = 32
    config.train.learning_rate = 5e-6
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    config.eval.every_steps = 100
    config.eval.global_batch_size = 32
    config.eval.early_stopping_patience = 3
    config.checkpoint.every_steps = 200
    return config
