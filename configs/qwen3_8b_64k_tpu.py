"""LoRA (r=16, every linear layer) on Qwen3-8B with 64k-token rows on a TPU v5p-64 slice (32
chips, 95 GB HBM each): the recipe of configs/llama3_1_8b_32k_cp.py with context parallelism
over 8 chips x tensor parallelism over 4.

Qwen3-8B's native context is 32768 tokens; its model card reaches 131072 with YaRN. Copy the
checkpoint and add to its config.json
  "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
then point --config.model.name_or_path at the copy (sft_jax applies YaRN as transformers does,
attention factor included; tests/test_long_rope.py).
Mesh: context=8 x tensor=4: each row's 65536 tokens split over 8 chips (8192 each), heads and
MLP over 4. Attention "xla": splash cannot run with the sequence split (its causal tiles
assume tokens in order).
Per-device memory (XLA's plan of the compiled step, from the model's shapes, no weights):
  python benchmarks/bench_long.py --preset=qwen3_8b_64k_tpu
not measured for this change (the compile did not finish on its shared 2-core CPU).
  python main.py --config=configs/qwen3_8b_64k_tpu.py --workdir=gs://BUCKET/qwen3_8b_64k \\
      --config.model.name_or_path=/path/to/Qwen3-8B-yarn
"""

from configs import llama3_1_8b_32k_cp


def get_config():
    config = llama3_1_8b_32k_cp.get_config()  # LoRA r=16 on LongAlign, 262k tokens an update
    config.model.name_or_path = "Qwen/Qwen3-8B"
    config.model.attention = "xla"
    config.mesh.fsdp = 1
    config.mesh.context = 8
    config.mesh.tensor = 4
    config.data.train_on = "all_assistant"
    config.data.max_length = 65536
    config.train.global_batch_size = 4
    config.eval.global_batch_size = 1
    return config
