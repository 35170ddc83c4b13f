"""LoRA (r=16, every linear layer) on Llama-3.1-8B-Instruct with 32k-token rows: the recipe of
configs/llama3_1_8b_lora.py with the sequence split over 4 GPUs (context parallelism).

Mesh: one host of 8 GPUs (80 GB) as fsdp=2 x context=4: each row's 32768 tokens are split over
4 devices (8192 each, in a causally load-balanced order), keys and values gathered per layer;
the two fsdp groups take a row each. Attention "auto" takes cuDNN's fused kernel with a mask
per shard (splash and cuDNN's packed layout assume tokens in order).
Per-device memory (XLA's plan of the compiled step, from the model's shapes, no weights):
  python benchmarks/bench_long.py --preset=llama3_1_8b_32k_cp
not measured for this change (the compile did not finish on its shared 2-core CPU).
  python main.py --config=configs/llama3_1_8b_32k_cp.py --workdir=/tmp/llama3_1_8b_32k_cp
"""

from configs import llama3_1_8b_lora


def get_config():
    config = llama3_1_8b_lora.get_config()
    config.mesh.fsdp = 2
    config.mesh.context = 4
    # Long instruction-following chats (8k-64k tokens): longer ones are cut to 32768 tokens.
    config.data.train_files = "hf:THUDM/LongAlign-10k"
    config.data.max_length = 32768
    config.data.overlong = "truncate"
    config.train.global_batch_size = 8  # rows of 32768 tokens: 262k tokens per update
    config.train.gradient_accumulation_steps = 4
    config.train.steps = 600
    config.train.loss_chunk_size = 1024
    config.eval.global_batch_size = 2
    config.eval.every_steps = 100
    config.checkpoint.every_steps = 100
    return config
