"""Full fine-tuning of Gemma-2-2B-it on No Robots (gated model: accept Gemma's terms on the hub).

Gemma's template has no system role: examples with a system message are counted and skipped.
Sized for one 80 GB GPU (fp32 weights, gradients and Adam moments: ~42 GB) or a TPU host
(attention "auto" picks splash on TPUs; on GPUs einsums, as cuDNN attention cannot soft-cap):
  python main.py --config=configs/gemma2_2b.py --workdir=/tmp/gemma2_2b_sft
Plan it before a GPU is rented (XLA's memory per device, no weights read; not yet run for this
preset, so no planner figure is quoted here):
  python -m sft_jax.plan --config=configs/gemma2_2b.py --devices=1 --device_memory=80GB
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
    config.train.gradient_accumulation_steps = 8  # micro-batches of 4 rows
    config.train.learning_rate = 5e-6
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    config.eval.every_steps = 100
    config.eval.early_stopping_patience = 3
    config.eval.global_batch_size = 8
    config.eval.generate_examples = 0  # open-ended replies: samples only, no exact match
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 200
    return config
