"""LoRA (r=16, attention projections) on gpt-oss-20b, a mixture of 32 experts (4 active per
token, 3.6B of 20.9B parameters active) with attention sinks and alternating 128-token sliding
and full layers, with UltraChat.

The hub checkpoint stores its experts MXFP4-quantized (config.json quantization_config): sft_jax
dequantizes them to bf16 as it loads them (each device its slice; models/io/mxfp4.py), so the run
points at the hub id as is; an export writes them as bf16 without quantization_config. With
--config.lora.quantize=mxfp4 --config.lora.quant_block_size=32 (QLoRA) the frozen weights are
held as MXFP4 after loading, the experts exactly as the checkpoint stores them (not planned here).

Model facts checked against the public config.json of openai/gpt-oss-20b (as vendored at
github.com/jihengzhang/jihz-gpt-oss-20b, gpt-oss-20b/config.json; assets/model_configs/
gpt_oss_20b holds the same fields): 24 layers alternating sliding_attention (window 128) and
full_attention, 32 local experts of width 2880, 4 per token, D 2880, 64 query and 8 kv heads of
64, vocab 201088, untied embeddings, YaRN factor 32 over 4096, swiglu_limit 7.0,
output_router_logits false with router_aux_loss_coef 0.9. Counted from those shapes (and by
sft_jax's model of that config): 20,914,757,184 parameters, 3,608,307,264 active (4 of 32
experts, the input embedding not counted, as the model card's 21B / 3.6B count them).

Attention runs the blockwise kernel ('auto' picks it on GPUs: cuDNN has no sinks).

Mesh: one host of 8 GPUs (80 GB) as fsdp=2 x expert=4: each device holds 8 of the 32 experts
of every layer, halved again by fsdp. The planner (the step compiled from config.json on 8
fake CPU devices, the blockwise attention, the experts' ragged_dot with the grouped-matmul
stand-in, bf16 read back from an f32 compile, 2 and 4 layers extrapolated to 24; about 50 s
of CPU time) predicts 32.1 GiB per device for this mesh with 2 micro-batches (one row of 4096
tokens per device at a time); with 1 micro-batch it plans 143 GiB, which does not fit:
  python -m sft_jax.plan --config=configs/gpt_oss_20b_lora.py --devices=8 \
    --device_memory=80GB --model_config=assets/model_configs/gpt_oss_20b \
    --meshes=1x2x4x1 --accumulation=2
  python main.py --config=configs/gpt_oss_20b_lora.py --workdir=/tmp/gpt_oss_20b_lora
"""

from configs import base


def get_config():
    config = base.get_config()
    config.model.name_or_path = "openai/gpt-oss-20b"  # MXFP4 experts, dequantized on load
    config.model.param_dtype = "bfloat16"  # the frozen base in bf16; adapters stay fp32
    config.model.compute_dtype = "bfloat16"
    config.model.remat = "full"
    config.mesh.fsdp = 2
    config.mesh.expert = 4
    config.lora.rank = 16
    config.lora.alpha = 32.0
    config.lora.target_modules = "q_proj,k_proj,v_proj,o_proj"  # experts and router frozen
    config.data.train_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.train_split = "train_sft"
    config.data.eval_files = "hf:HuggingFaceH4/ultrachat_200k"
    config.data.eval_split = "test_sft"
    config.data.eval_max_examples = 2000
    config.data.max_length = 4096
    config.train.steps = 1000
    config.train.global_batch_size = 16
    config.train.gradient_accumulation_steps = 2  # 1 plans 143 GiB per device (see above)
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 50
    config.train.weight_decay = 0.0
    # No load-balancing loss, as transformers trains this checkpoint (its config.json has
    # output_router_logits false; its router_aux_loss_coef, 0.9, applies only when that is on).
    config.train.router_aux_loss_coef = 0.0
    config.eval.every_steps = 250
    config.eval.global_batch_size = 16
    config.eval.generate_examples = 0  # open-ended replies: samples only, no exact match
    config.eval.max_new_tokens = 128
    config.checkpoint.every_steps = 250
    return config
