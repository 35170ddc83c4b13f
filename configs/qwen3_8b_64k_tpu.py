"""LoRA (r=16, every linear layer) on Qwen3-8B with 64k-token rows on a TPU v5p-64 slice (32
chips, 95 GB HBM each): the recipe of configs/llama3_1_8b_32k_cp.py with context parallelism
over 8 chips x tensor parallelism over 4.

Qwen3-8B's native context is 32768 tokens; its model card reaches 131072 with YaRN. Copy the
checkpoint and add to its config.json
  "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
then point --config.model.name_or_path at the copy (sft_jax applies YaRN as transformers does,
attention factor included; tests/models/test_long_rope.py).
Mesh: context=8 x tensor=4: each row's 65536 tokens split over 8 chips (8192 each), heads and
MLP over 4. Both axes span the 8 hosts (4 chips each): the batch's rows are one block that
every host feeds whole, each chip taking its slice (sharding.row_feed). Attention
"blockwise" (flash-style, in plain JAX): splash cannot run with the sequence split (its
causal tiles assume tokens in order), and the einsum path ("xla") would hold [8192, 65536]
float32 scores per head and layer.
Per-device memory the planner predicts (XLA's plan of the train step compiled from config.json
on 32 fake CPU devices with the memory-weighing scheduler, bf16 read back from an f32 compile, 2
and 4 layers extrapolated to 36; 35 s CPU): 50.2 GiB per device with context=8 x tensor=4
and 4 micro-batches of one row, within a v5p chip's 95 GB; an upper bound until checked on a
TPU (docs/planning.md). The figure's source, assets/model_configs/qwen3_8b_yarn,
is Qwen3-8B's published config.json with the YaRN scaling above:
  python -m sft_jax.plan --config=configs/qwen3_8b_64k_tpu.py --devices=32 --accelerator=tpu \
    --peak_tflops=459 --interconnect_gbps=600 \
    --model_config=assets/model_configs/qwen3_8b_yarn --meshes=1x1x4 --accumulation=4
Run:
  python main.py --config=configs/qwen3_8b_64k_tpu.py --workdir=gs://BUCKET/qwen3_8b_64k \\
      --config.model.name_or_path=/path/to/Qwen3-8B-yarn
"""

from configs import llama3_1_8b_32k_cp


def get_config():
    config = llama3_1_8b_32k_cp.get_config()  # LoRA r=16 on LongAlign, 262k tokens an update
    config.model.name_or_path = "Qwen/Qwen3-8B"
    config.model.attention = "blockwise"
    config.mesh.fsdp = 1
    config.mesh.context = 8
    config.mesh.tensor = 4
    config.data.train_on = "all_assistant"
    config.data.max_length = 65536
    config.train.global_batch_size = 4
    config.train.gradient_accumulation_steps = 4  # one row of 65536 tokens at a time
    config.eval.global_batch_size = 1
    return config
