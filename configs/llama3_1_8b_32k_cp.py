"""LoRA (r=16, every linear layer) on Llama-3.1-8B-Instruct with 32k-token rows: the recipe of
configs/llama3_1_8b_lora.py with the sequence split over the 8 GPUs of one host (context
parallelism).

Mesh: context=8: each row's 32768 tokens are split over the 8 devices (4096 each, in a causally
load-balanced order), keys and values gathered per layer; one row per micro-batch, 8
micro-batches. Attention "auto" takes cuDNN's fused kernel with a mask per shard (splash and
cuDNN's packed layout assume tokens in order); attention='blockwise' needs no mask.
Per-device memory the planner predicts (XLA's plan of the train step compiled from config.json
on 8 fake CPU devices with the memory-weighing scheduler, cuDNN planned with the blockwise
stand-in, bf16 read back from an f32 compile, 2 and 4 layers extrapolated to 32; about 40 s CPU
each), with 80 GB GPUs in mind:
  context=8, 8 micro-batches                  19.7 GiB (the lowest; this preset)
  context=4 x tensor=2, 8 micro-batches       58.7 GiB
  context=4 x fsdp=2, 4 micro-batches        106 GiB (does not fit)
(Before the planner compiled with XLA:CPU's memory-optimized scheduler these read 77.3, 82.4 and
151 GiB: the default scheduler held every layer's gathered weights at once.) The fsdp row is an
upper bound: XLA:CPU drops remat's optimization barriers, so some backward all-gathers start
early (docs/planning.md). Check on a GPU before relying on the figures.
  python -m sft_jax.plan --config=configs/llama3_1_8b_32k_cp.py --devices=8 --peak_tflops=989 \
    --interconnect_gbps=450 --model_config=assets/model_configs/llama3_1_8b \
    --contexts=8 --meshes=1x1x1 --accumulation=8
(--contexts=4 --meshes=1x1x2 --accumulation=8, or --meshes=1x2x1 --accumulation=4 --contexts=4
for the other two rows.) Run:
  python main.py --config=configs/llama3_1_8b_32k_cp.py --workdir=/tmp/llama3_1_8b_32k_cp
"""

from configs import llama3_1_8b_lora


def get_config():
    config = llama3_1_8b_lora.get_config()
    config.mesh.fsdp = 1
    config.mesh.context = 8
    # Long instruction-following chats (8k-64k tokens): longer ones are cut to 32768 tokens.
    config.data.train_files = "hf:THUDM/LongAlign-10k"
    config.data.max_length = 32768
    config.data.overlong = "truncate"
    config.train.global_batch_size = 8  # rows of 32768 tokens: 262k tokens per update
    config.train.gradient_accumulation_steps = 8
    config.train.steps = 600
    config.train.loss_chunk_size = 1024
    config.eval.global_batch_size = 2
    config.eval.every_steps = 100
    config.checkpoint.every_steps = 100
    return config
