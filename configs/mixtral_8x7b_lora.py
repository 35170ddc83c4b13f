"""LoRA (r=16, attention projections) on Mixtral-8x7B-Instruct-v0.1, 8 experts (2 active per
token, 12.9B of 46.7B parameters active), with Alpaca: the recipe of configs/llama3_1_8b_lora.py
with what differs.

Mesh: one host of 8 GPUs (80 GB) as fsdp=1 x expert=8: one expert of every layer per device.
Weights alone (bf16, arithmetic, not XLA's memory plan): 45.1B expert parameters / 8 devices
= 11.3 GB, plus 1.6B attention/embedding parameters replicated = 3.2 GB, about 14.5 GB per
device before activations; the log prints XLA's plan of the compiled step.
  python main.py --config=configs/mixtral_8x7b_lora.py --workdir=/tmp/mixtral_8x7b_lora
"""

from configs import llama3_1_8b_lora


def get_config():
    config = llama3_1_8b_lora.get_config()
    config.model.name_or_path = "mistralai/Mixtral-8x7B-Instruct-v0.1"
    config.mesh.fsdp = 1
    config.mesh.expert = 8
    config.lora.target_modules = "q_proj,k_proj,v_proj,o_proj"  # experts and router frozen
    config.train.gradient_accumulation_steps = 1
    config.eval.global_batch_size = 16
    config.eval.early_stopping_patience = 0
    return config
