"""LoRA (r=16, attention projections) on Mixtral-8x7B-Instruct-v0.1, 8 experts (2 active per
token, 12.9B of 46.7B parameters active), with Alpaca.

Mesh: one host of 8 GPUs (80 GB) as fsdp=1 x expert=8: one expert of every layer per device.
Weights alone (bf16, arithmetic, not XLA's memory plan): 45.1B expert parameters / 8 devices
= 11.3 GB, plus 1.6B attention/embedding parameters replicated = 3.2 GB, about 14.5 GB per
device before activations; the log prints XLA's plan of the compiled step.
  python main.py --config=configs/mixtral_8x7b_lora.py --workdir=/tmp/mixtral_8x7b_lora
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "mistralai/Mixtral-8x7B-Instruct-v0.1"
    config.model.param_dtype = "bfloat16"
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.mesh.fsdp = 1
    config.mesh.expert = 8
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.dropout = 0.05
    config.lora.target_modules = "q_proj,k_proj,v_proj,o_proj"  # experts and router frozen
    config.data.train_files = "hf:yahma/alpaca-cleaned"
    config.data.eval_files = ""
    config.data.eval_fraction = 0.02
    config.data.max_length = 2048
    config.train.steps = 1500
    config.train.global_batch_size = 16
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    config.eval.every_steps = 250
    config.eval.global_batch_size = 16
    config.eval.generate_examples = 0
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 250
    return config
