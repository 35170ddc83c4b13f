"""Offline default: fine-tune the tiny demo model shipped in this repository.

Run:
  python main.py --config=configs/base.py --workdir=/tmp/sft_demo
"""

from pathlib import Path

import ml_collections

# Paths relative to this repository, so the demo runs from any working directory.
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # ---------------------------------------------------------------- model
    config.model = ml_collections.ConfigDict()
    # Local Hugging Face directory (config.json + *.safetensors) or a hub id.
    config.model.name_or_path = str(ASSETS / "demo_model")
    # dtype the parameters (and optimizer moments) are stored in: "float32" or "bfloat16".
    config.model.param_dtype = "float32"
    # dtype of activations and matmul inputs: "float32", or "bfloat16" for mixed precision.
    config.model.compute_dtype = "float32"
    # Activation checkpointing per decoder layer: "none", "full" (recompute the layer in the
    # backward pass), "save_matmuls" (keep the weight matmuls' outputs, recompute the rest,
    # attention scores included), "offload" (the same outputs kept in pinned host memory, not on
    # the device; GPUs and TPUs only) or "auto" (the first of none, save_matmuls, offload where
    # the backend can, full whose compiled train step XLA plans within 95% of the device's
    # memory; "none" where the memory is unknown, as on CPU; each try costs a compile; the log
    # says which and why).
    config.model.remat = "none"
    # Attention kernel in training: "auto" (the fused kernel of the accelerator where the model
    # allows it, else "xla", also if the kernel does not compile; the log says which and why),
    # "xla" (explicit einsums; every backend), "cudnn" (fused cuDNN flash attention; NVIDIA
    # GPUs, bfloat16 compute, no soft-capping), "splash" (Pallas splash attention; TPUs,
    # max_length a multiple of 128) or "blockwise" (flash-style attention in plain JAX, every
    # backend: memory of a fused kernel, never a [T, T] score matrix; models/kernels/blockwise.py).
    config.model.attention = "auto"
    # Mixtures of experts under an expert mesh axis: how tokens reach the device holding their
    # expert. "gather" (the expert group's tokens gathered, partial outputs reduce-scattered
    # back), "all_to_all" (each token copy sent to its expert's device and back, in fixed
    # buffers sized for the worst case: top_k times gather's bytes) or "auto" (= "gather";
    # docs/moe.md has the measured comparison).
    config.model.moe_dispatch = "auto"
    # An image-text model: train its vision tower too (False: frozen, the decoder trains).
    config.model.train_vision = False

    # ---------------------------------------------------------------- data
    config.data = ml_collections.ConfigDict()
    # Training data: comma-separated paths or globs of .jsonl / .json / .parquet / .csv files,
    # or a hub dataset as "hf:NAME" or "hf:NAME:SUBSET".
    config.data.train_files = str(ASSETS / "demo_data" / "train.jsonl")
    # Split of a hub dataset to train on (ignored for local files).
    config.data.train_split = "train"
    # Eval data, same syntax; "" = hold out eval_fraction of the training examples instead.
    config.data.eval_files = str(ASSETS / "demo_data" / "eval.jsonl")
    config.data.eval_split = "test"
    # Evaluate on only the first N eval examples (0 = all of them, every eval).
    config.data.eval_max_examples = 0
    # Fraction of training examples held out for eval when eval_files is "" (0 = no eval).
    config.data.eval_fraction = 0.0
    # "auto" (from the fields of the first example), "messages", "sharegpt",
    # "prompt_completion", "alpaca" or "text".
    config.data.format = "auto"
    # Tokenizer directory or hub id; "" = the model's own.
    config.data.tokenizer = ""
    # Chat template: "" = the tokenizer's own, "chatml" (built in), a .jinja file, or the text.
    config.data.chat_template = ""
    # Tokens that carry the loss: "all_assistant" (every assistant reply and the token that
    # ends it), "last_assistant" (only the final reply) or "all_tokens".
    config.data.train_on = "all_assistant"
    # Reasoning ("reasoning_content", "reasoning", "thinking" or inline <think>) that trains:
    # "all", "last_turn" (only the final assistant message's) or "none" (kept as context).
    config.data.train_reasoning = "all"
    # Keyword arguments of the chat template, as a JSON object, e.g. '{"enable_thinking":
    # false}' (an example's own "chat_template_kwargs" field adds to and overrides these).
    config.data.template_kwargs = ""
    # Tokens per row (the sequence length; long-context runs go to 131072 with mesh.context);
    # longer examples are cut to this length or dropped (data.overlong).
    config.data.max_length = 128
    # Pack several examples into each row (attention never crosses examples); False pads
    # each example to max_length alone.
    config.data.packing = True
    # Most examples packed into one row (0 = no limit). A bound keeps the fused cuDNN kernel's
    # table of documents per row small (attention="cudnn"); rows of short examples close early.
    config.data.max_documents_per_row = 64
    # Rows with images (an image-text model): most images, and most image patches (the vision
    # tower's inputs; Qwen2.5-VL: a 448 x 448 image is 1024), one row holds. Fixed per run: the
    # compiled steps take arrays of this size; a document over either stops with an error.
    config.data.max_images_per_row = 8
    config.data.max_image_patches_per_row = 4096
    # Shuffle the rows of every epoch (seeded by train.seed).
    config.data.shuffle = True
    # Count and skip malformed examples instead of stopping at the first with an error.
    config.data.skip_bad_examples = False
    # An assistant reply with no text trains only its end-of-turn token: "warn" trains such
    # examples and logs their count and the first one, "skip" drops them (counted), "error"
    # stops at the first one, naming its file and line.
    config.data.empty_replies = "warn"
    # An example longer than max_length tokens: "truncate" keeps its first max_length tokens
    # (counted as truncated), "drop" leaves it out (counted as dropped, reason "too_long").
    # Never split across rows.
    config.data.overlong = "truncate"
    # Processes that tokenize (0 = auto: one for local data under 64 MiB, else one per core
    # up to 8).
    config.data.num_workers = 0
    # Where tokenized data is cached ("" = $SFT_JAX_CACHE or ~/.cache/sft_jax/tokenized;
    # "none" = never cache).
    config.data.cache_dir = ""
    # Train batches built and put on the devices ahead of the step, in a background thread.
    config.data.prefetch = 2
    # "memory": every process tokenizes (or loads from the cache) all data into memory and
    # packs whole epochs. "stream": tokenized stores on disk, memory-mapped (written once by
    # `python -m sft_jax.data.prepare`, or on demand), each process reading only its own rows;
    # host memory stays flat however large the data (sft_jax.data.stream). "auto": "stream"
    # when the training files hold more than 256 MiB (or a mixture / contamination check is
    # set), else "memory" (also with eval_fraction, or a prompt method that adds tokens to
    # rows); a resumed run keeps the loader it was trained with. The log says which and why.
    config.data.loader = "auto"
    # With loader="stream": documents packed together (a window of the stream); larger packs
    # tighter, costs more memory (~100 bytes a document).
    config.data.stream_window = 8192
    # With loader="stream": a weighted mixture of sources instead of train_files/eval_files, a
    # list of dicts {"name", "train_files", "weight", and optionally "eval_files",
    # "train_split", "eval_split", "format", "template_kwargs", "max_examples" (training
    # examples read; 0 = all)}. Weights are relative; small sources repeat, reshuffled, each
    # epoch; each source with eval files also reports eval/<name>/loss.
    config.data.mixture = []
    # With loader="stream": eval examples whose prompt or reply also occurs in training (exact
    # after normalising whitespace): "off", "report" (counted in the log), "drop" (also
    # removed from eval).
    config.data.contamination = "off"

    # ---------------------------------------------------------------- lora
    # Parameter-efficient fine-tuning; rank 0 = full fine-tuning of every parameter.
    config.lora = ml_collections.ConfigDict()
    # Adapter rank r (0 = off).
    config.lora.rank = 0
    # Adapter scale numerator: updates are scaled by alpha / r (alpha / sqrt(r) with rsLoRA).
    config.lora.alpha = 16.0
    # Dropout probability on the adapters' input during training.
    config.lora.dropout = 0.05
    # Comma-separated projections to adapt (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    # down_proj) or "all-linear".
    config.lora.target_modules = "all-linear"
    # Scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
    config.lora.use_rslora = False
    # Comma-separated modules trained in full besides the adapters: "embed", "lm_head" (needed
    # when a chat format adds new tokens, whose rows must learn).
    config.lora.trainable_modules = ""
    # Mixtures of experts: adapters on every expert's gate/up/down projections too (A [X, in, r],
    # B [X, r, out] per projection); such runs export the merged model only (no PEFT adapter).
    config.lora.expert_adapters = False
    # Mixtures of experts: train the routers in full beside the adapters (else frozen).
    config.lora.train_router = False
    # Image-text models: adapters on the vision tower and projector too (plain LoRA, needs
    # lora.dropout=0): "" none, "all-linear", or names as transformers has them, Gemma 3's
    # q_proj,k_proj,v_proj,out_proj,fc1,fc2,mm_input_projection_weight, Qwen2.5-VL's
    # qkv,proj,gate_proj,up_proj,down_proj,mlp.0,mlp.2 (sft_jax/adapters/vision_lora.py).
    config.lora.vision_targets = ""
    # QLoRA: store the frozen linear weights as "nf4", "int8" or "mxfp4" (gpt-oss's experts'
    # format: blocks of 32, quant_block_size=32, one E8M0 byte scale; "" = as loaded).
    config.lora.quantize = ""
    # Weights per quantization block (one absmax scale each).
    config.lora.quant_block_size = 64
    # Quantize the block scales too (int8 around their mean): ~0.5 instead of ~0.56 byte/weight.
    # (Not mxfp4's, a byte each already.)
    config.lora.double_quant = True
    # DoRA (PEFT's use_dora): each adapted weight is a trained magnitude per output feature
    # times the direction of W + scale * B A (method "lora" only; works with quantize).
    config.lora.use_dora = False
    # "lora", or "adalora": SVD-form adapters of initial rank lora.rank (PEFT's init_r) whose
    # ranks are pruned to an average of adalora.target_r per layer while training.
    config.lora.method = "lora"
    # AdaLoRA's schedule and regulariser, with PEFT's AdaLoraConfig names (steps = updates).
    config.lora.adalora = ml_collections.ConfigDict()
    # Average rank per adapted layer left after the schedule (PEFT's target_r).
    config.lora.adalora.target_r = 4
    # Updates at full rank before pruning starts (tinit), and at the final ranks at the end
    # (tfinal).
    config.lora.adalora.tinit = 0
    config.lora.adalora.tfinal = 0
    # Updates between two rank allocations while the budget falls (PEFT's deltaT).
    config.lora.adalora.delta_t = 1
    # EMA decay rates of the sensitivity |w * grad| and of its uncertainty.
    config.lora.adalora.beta1 = 0.85
    config.lora.adalora.beta2 = 0.85
    # Weight of the orthogonality regulariser ||P^T P - I||_F + ||Q Q^T - I||_F in the loss.
    config.lora.adalora.orth_reg_weight = 0.5
    # Updates the budget schedule spans (PEFT's total_step); 0 = train.steps.
    config.lora.adalora.total_step = 0

    # ---------------------------------------------------------------- prompt
    # Virtual-token methods (PEFT's prompt learning): the model stays frozen and only these
    # train; exported as a PEFT adapter in WORKDIR/export/adapter. Not with LoRA (lora.rank 0).
    config.prompt = ml_collections.ConfigDict()
    # "" (off), "prompt_tuning" (trained embeddings of N virtual tokens before every document),
    # "p_tuning" (the same, computed by an MLP or LSTM prompt encoder) or "prefix_tuning"
    # (trained keys and values of N virtual tokens in every layer; P-tuning v2).
    config.prompt.method = ""
    # N, virtual tokens. Prompt and P-tuning place them in every document, so they count
    # against data.max_length (documents are cut to max_length - N, counted as truncated).
    config.prompt.num_virtual_tokens = 20
    # prompt_tuning's start: "random" (N(0, 1)), "sample_vocab" (embeddings of random vocabulary
    # tokens) or "text" (embeddings of init_text's tokens, repeated or cut to N).
    config.prompt.init = "random"
    # The text of init="text".
    config.prompt.init_text = ""
    # p_tuning's prompt encoder: "mlp" (3 layers, ReLU) or "lstm" (bidirectional, then 2 layers).
    config.prompt.encoder_type = "mlp"
    # Width H of the prompt encoder (p_tuning) or of the prefix projection; 0 = PEFT's default,
    # the token width (prefix tuning: key/value heads x head dim).
    config.prompt.encoder_hidden_size = 0
    # Layers of p_tuning's LSTM encoder.
    config.prompt.encoder_num_layers = 2
    # prefix_tuning: compute the prefixes with an MLP (embedding -> H -> tanh -> keys/values of
    # every layer) while training; the export holds the computed prefixes, as PEFT saves them.
    config.prompt.prefix_projection = False

    # ---------------------------------------------------------------- train
    config.train = ml_collections.ConfigDict()
    # Optimizer updates to run (each over one global batch).
    config.train.steps = 800
    # Rows of config.data.max_length tokens per optimizer update, over all hosts and devices.
    config.train.global_batch_size = 32
    # Micro-batches each global batch is split into inside the step (to save memory); the
    # update is the same as for the whole batch.
    config.train.gradient_accumulation_steps = 1
    # Peak learning rate (AdamW), reached after warmup_steps.
    config.train.learning_rate = 1e-3
    # After warmup: "cosine", "linear" (decay to min_lr_ratio * learning_rate) or "constant".
    config.train.lr_schedule = "cosine"
    # Updates of linear warmup from 0 to learning_rate.
    config.train.warmup_steps = 20
    # Final learning rate as a fraction of the peak.
    config.train.min_lr_ratio = 0.1
    # Decoupled weight decay (AdamW) on matrices; never on norms or biases.
    config.train.weight_decay = 0.01
    # Adam moment decay rates and epsilon.
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.95
    config.train.adam_eps = 1e-8
    # Clip the global gradient norm to this (0 = no clipping).
    config.train.max_grad_norm = 1.0
    # Weight of the z-loss, mean over target tokens of logsumexp(logits)^2 (0 = off).
    config.train.z_loss_weight = 0.0
    # Mixtures of experts: weight of the load-balancing loss (transformers'
    # load_balancing_loss_func, over real tokens); -1 = the checkpoint's router_aux_loss_coef.
    config.train.router_aux_loss_coef = -1.0
    # Mixtures of experts: weight of the router z-loss, mean over real tokens and MoE layers of
    # logsumexp(router logits)^2 (0 = off).
    config.train.router_z_loss_weight = 0.0
    # NEFTune (TRL's neftune_noise_alpha): uniform noise in [-1, 1] * alpha / sqrt(L * d) on the
    # token embeddings in training (L the row length, d the width), never at eval or in
    # generation; 0 = off, 5 is the paper's usual value.
    config.train.neftune_noise_alpha = 0.0
    # Time steps whose logits are computed at once in the loss ([batch, chunk, vocab] fp32).
    config.train.loss_chunk_size = 512
    # Seed of parameter initialization and of data order.
    config.train.seed = 0
    # What the step optimizes: "sft" (cross-entropy on the trained tokens), or on preference
    # pairs (config.preference; data with chosen/rejected fields): "dpo", "simpo" or "orpo";
    # or "reward": a reward model (a scalar score head, Bradley-Terry loss) on the same pairs;
    # or "grpo": online RL on prompts with verifiable rewards (config.grpo).
    config.train.objective = "sft"

    # ---------------------------------------------------------------- preference
    # Preference tuning (config.train.objective != "sft"), with TRL's names and definitions.
    config.preference = ml_collections.ConfigDict()
    # DPO's loss: "sigmoid" (with label_smoothing: cDPO), "robust", "hinge" or "ipo".
    config.preference.loss_type = "sigmoid"
    # Temperature of the implicit reward (DPO, IPO's tau, SimPO's beta; ORPO's lambda).
    config.preference.beta = 0.1
    # Assumed share of flipped labels (cDPO with "sigmoid", "robust"; SimPO), in [0, 0.5).
    config.preference.label_smoothing = 0.0
    # SimPO's target reward margin gamma.
    config.preference.simpo_gamma = 0.5
    # Weight of the NLL of the chosen replies (their completion tokens) added to the loss (RPO;
    # CPO's cpo_alpha).
    config.preference.rpo_alpha = 0.0
    # ORPO's NLL term (weight 1) over the chosen sequence's "prompt_and_reply" (every token after
    # its first: TRL's ORPOTrainer, the ORPO authors' code) or its "reply" only.
    config.preference.orpo_nll = "prompt_and_reply"
    # DPO's reference model: "adapters_off" (LoRA / QLoRA: the same weights with the adapters
    # switched off, no second copy in memory), "copy" (a frozen copy of the initial weights,
    # sharded like them: one more copy of the weights in memory, none in the optimizer state),
    # "precomputed" (the reference's log-probs of every train and eval pair, computed in one
    # pass with the initial weights (adapters off) before training and read from the batches:
    # no reference weights, no reference forward per step; redone on a resume), or "auto":
    # adapters_off under LoRA, else copy.
    config.preference.reference = "auto"
    # DPO's reference as another model (TRL's ref_model): "" = the initial policy (above); else
    # a Hugging Face model directory or hub id (safetensors only), loaded as model.name_or_path
    # is and sharded like it, of the same architecture and vocabulary (e.g. the SFT model a DPO
    # run starts from, or that run's reference when continuing from its export). With it,
    # preference.reference is "copy" or "auto" (its frozen weights beside the policy, run every
    # step) or "precomputed" (its log-probs computed once before training; its weights stay
    # in memory as frozen variables); "adapters_off" is an error. LoRA or full fine-tuning.
    config.preference.reference_model = ""
    # Reward models: weight of mean (r_chosen + r_rejected)^2 in the loss, which keeps rewards
    # centred on 0 (TRL's center_rewards_coefficient; 0 = off).
    config.preference.center_rewards_coefficient = 0.0

    # ---------------------------------------------------------------- grpo
    # Online RL (config.train.objective = "grpo"), with TRL 1.16's GRPOConfig names and
    # definitions. Each update trains on train.global_batch_size completions: global_batch_size /
    # num_generations prompts of config.data.train_files (TRL's prompt format: a `prompt` string
    # or message list, other fields passed to the reward functions), num_generations completions
    # each, sampled in this process from the live params on the training mesh.
    config.grpo = ml_collections.ConfigDict()
    # Completions per prompt (TRL's G); at least 2 (the group is each one's baseline).
    config.grpo.num_generations = 8
    # Longest prompt, in tokens (templated); longer ones: see long_prompts.
    config.grpo.max_prompt_length = 256
    # Longest completion, in tokens; rows are max_prompt_length + max_completion_length long.
    config.grpo.max_completion_length = 256
    # A prompt longer than max_prompt_length: "skip" (counted and logged with its file:line)
    # or "error".
    config.grpo.long_prompts = "skip"
    # Sampling: softmax(logits / temperature), then top_k (0 = off), top_p, min_p (0 = off),
    # as transformers' generate applies them. The loss's log-probs use the same temperature.
    config.grpo.temperature = 1.0
    config.grpo.top_p = 1.0
    config.grpo.top_k = 0
    config.grpo.min_p = 0.0
    # The loss: "dapo" (TRL's default), "grpo", "dr_grpo", "bnpo" or "cispo"
    # (sft_jax/objectives/grpo.py has each definition).
    config.grpo.loss_type = "dapo"
    # Importance ratio per "token", or per "sequence" (GSPO: the mean log-ratio's exponential).
    config.grpo.importance_sampling_level = "token"
    # Advantages: reward minus the group's mean, divided by the std of the "group", of the
    # "batch", or "none" (Dr. GRPO).
    config.grpo.scale_rewards = "group"
    # Clipping of the ratio to [1 - epsilon, 1 + epsilon_high] (epsilon_high 0: = epsilon;
    # DAPO's clip-higher uses 0.28); delta > 0 also caps the unclipped ratio (two-sided clip).
    config.grpo.epsilon = 0.2
    config.grpo.epsilon_high = 0.0
    config.grpo.delta = 0.0
    # Weight of the k3 KL estimate against the reference (the initial policy: adapters off under
    # LoRA, else a frozen copy of the initial weights); 0 = no reference (TRL's default).
    config.grpo.beta = 0.0
    # Completions cut at max_completion_length (no stop token) carry no loss.
    config.grpo.mask_truncated_completions = False
    # Reward functions, comma-separated: built-ins "math" (answer equal by value, math-verify),
    # "exact_match", "think_format", "overlong" (DAPO's length penalty), a reward model's export
    # as "reward_model:DIR", or "package.module:function" with TRL's signature; their weights
    # ("" = 1.0 each).
    config.grpo.reward_funcs = "math"
    config.grpo.reward_weights = ""
    # Optimizer updates on each rollout (TRL's num_iterations, mu): the ratio's denominator is
    # the policy that sampled it.
    config.grpo.num_iterations = 1
    # The numerics gate: stop when the sampler's log-prob of a sampled token differs from the
    # training forward's on the same params by more than this (0 = off).
    config.grpo.max_sampling_logp_difference = 1.0
    # TRL's truncated importance-sampling correction (vllm_importance_sampling_*): each token's
    # loss weighted by exp(trainer - sampler log-prob), truncated ("token_truncate",
    # "sequence_truncate") or masked ("token_mask", "sequence_mask") outside [clip_min,
    # clip_max] (0: unbounded). Off: the in-process sampler computes the trainer's distribution
    # (the gate above checks it); for a sampler in lower precision.
    config.grpo.importance_sampling_correction = False
    config.grpo.importance_sampling_mode = "sequence_mask"
    config.grpo.importance_sampling_clip_min = 0.0
    config.grpo.importance_sampling_clip_max = 3.0
    # Held-out prompts (config.data.eval_files) at each eval: mean reward of greedy replies
    # (pass@1) and pass@k of this many samples at the sampling settings (0 = greedy only).
    config.grpo.eval_samples = 4

    # ---------------------------------------------------------------- ppo
    # Classic RLHF (config.train.objective = "ppo"): rollouts, rewards (a reward model's export
    # as grpo.reward_funcs = "reward_model:DIR") and sampling as config.grpo says; a value head
    # on the policy's trunk as the critic. TRL's PPOConfig names and defaults
    # (sft_jax/objectives/ppo.py has the formulas).
    config.ppo = ml_collections.ConfigDict()
    # GAE's discount and lambda.
    config.ppo.gamma = 1.0
    config.ppo.lam = 0.95
    # The per-token KL penalty's weight in the rewards (against the initial policy).
    config.ppo.kl_coef = 0.05
    # The policy ratio's clip, the value's clip around its rollout estimate.
    config.ppo.cliprange = 0.2
    config.ppo.cliprange_value = 0.2
    # The value loss's weight beside the policy loss.
    config.ppo.vf_coef = 0.1
    # The critic: "" = a value head on the policy's trunk; a reward model's export (a folder)
    # as a separate critic trained in full (TRL's value_model); "reward_model" = the one named
    # in grpo.reward_funcs.
    config.ppo.value_model = ""

    # ---------------------------------------------------------------- eval
    config.eval = ml_collections.ConfigDict()
    # Evaluate every N optimizer updates (0 = only at the end); also always at the last step.
    config.eval.every_steps = 100
    # Rows per eval batch, over all hosts and devices.
    config.eval.global_batch_size = 16
    # Evaluate before the first update, so the curve starts from the pretrained model.
    config.eval.at_start = True
    # At every eval, generate greedy replies to the first N eval examples (their last
    # assistant turn) and report eval/exact_match, the share equal to the reference (0 = off).
    config.eval.generate_examples = 200
    # Print and log (metrics.jsonl, TensorBoard text) the replies to the first K eval prompts
    # next to their references; they are generated (and scored) even when K > generate_examples.
    config.eval.show_samples = 3
    # Longest generated reply, in tokens.
    config.eval.max_new_tokens = 64
    # lm-evaluation-harness tasks scored on the live model at every eval, comma-separated (e.g.
    # "arc_easy,hellaswag"; "" = off): metrics harness/<task>/<metric>. Needs lm-eval installed.
    config.eval.harness_tasks = ""
    # Documents per harness task at each eval (0 = all of them).
    config.eval.harness_limit = 0
    # A folder of extra lm-eval task YAML files for eval.harness_tasks ("" = lm-eval's own only).
    config.eval.harness_include_path = ""
    # Stop after this many evals without an improvement of the eval loss (0 = never).
    config.eval.early_stopping_patience = 0
    # Smallest eval-loss decrease that counts as an improvement.
    config.eval.early_stopping_min_delta = 0.0

    # ---------------------------------------------------------------- checkpoint
    # Orbax checkpoints in WORKDIR/checkpoints; a WORKDIR holding some resumes from the newest.
    config.checkpoint = ml_collections.ConfigDict()
    # Save checkpoints at all (False: nothing is written to WORKDIR/checkpoints).
    config.checkpoint.enabled = True
    # Save every N updates (0 = only at the end); also at every eval and on SIGTERM / SIGINT.
    config.checkpoint.every_steps = 100
    # Keep the newest K checkpoints, plus the keep_best ones with the lowest eval loss.
    config.checkpoint.keep_last = 2
    config.checkpoint.keep_best = 1
    # Write in the background while training goes on.
    config.checkpoint.async_save = True
    # Start from another run's parameters (its WORKDIR; its best checkpoint, else its newest)
    # with a fresh optimizer: fine-tune a fine-tune. Ignored when WORKDIR has checkpoints.
    config.checkpoint.init_from = ""
    # A bucket WORKDIR (or init_from, or export.dir: s3://, gs://) is worked in locally and
    # uploaded: its local copy is STAGING_DIR/<bucket>/<path>; "" = $TMPDIR/sft_jax_staging.
    # With several processes, a directory all of them see (a shared file system).
    config.checkpoint.staging_dir = ""

    # ---------------------------------------------------------------- export
    # Hugging Face directory written when training ends (not after a stop signal).
    config.export = ml_collections.ConfigDict()
    # Which checkpoint: "best" (lowest eval loss), "last", or "none" to skip the export.
    config.export.at_end = "best"
    # Output directory, or a bucket URL (s3://, gs://; staged and uploaded); "" = WORKDIR/export.
    config.export.dir = ""

    # ---------------------------------------------------------------- mesh
    # Device mesh axes; their product is the device count, one -1 takes the rest.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = 1  # pure data parallelism (replicated parameters)
    config.mesh.fsdp = -1  # data parallelism with parameters and optimizer state sharded
    # expert parallelism: mixture-of-experts weights split over it, each device holding
    # num_experts / expert of them; elsewhere one more data-parallel axis. Divides num_experts.
    config.mesh.expert = 1
    config.mesh.tensor = 1  # tensor parallelism inside layers (heads, MLP width, vocab)
    # context parallelism for long sequences: every row's T tokens split over this many
    # devices (T / context each, in a causally load-balanced order), keys and values gathered
    # per layer. 2 x context must divide data.max_length; attention "blockwise" (scores a block
    # at a time), "cudnn" (a mask per shard), "xla" (scores [T / context, T]) or "auto".
    config.mesh.context = 1
    # True: the pre-flight planner (python -m sft_jax.plan) compiles candidate meshes, micro-batch
    # counts and remat policies before the run and it takes its recommendation: data, fsdp and
    # tensor above and train.gradient_accumulation_steps are then ignored, and model.remat only
    # where it is "auto" (else the planner keeps the policy named); context stays as set and the
    # other axes share the rest of the devices. The log says what it chose.
    config.mesh.auto = False

    # ---------------------------------------------------------------- log
    config.log = ml_collections.ConfigDict()
    # Write train metrics every N updates (eval metrics are written at every eval).
    config.log.every_steps = 10
    # Peak dense bf16 TFLOP/s of one device for MFU; 0 = detect (H100/H200, A100, TPUs).
    config.log.peak_tflops_per_device = 0.0
    # Where metrics go besides WORKDIR/metrics.jsonl (always written): any of "tensorboard"
    # (WORKDIR/tensorboard), "wandb", "trackio", "mlflow", as a comma-separated string
    # (--config.log.trackers=tensorboard,wandb) or a list; "" = metrics.jsonl alone. Each gets
    # the config, every metric, the eval samples as a table; a resume continues the same run
    # (its id is kept in WORKDIR/trackers.json). One that cannot start is a warning, not an error.
    config.log.trackers = ml_collections.FieldReference("tensorboard", field_type=object)
    # The run's name in the trackers; "" = the WORKDIR folder's name.
    config.log.run_name = ""
    # The W&B and trackio project, and the MLflow experiment.
    config.log.project = "sft_jax"
    # The W&B entity (team or user); "" = the account's default.
    config.log.wandb_entity = ""
    # MLflow tracking URI; "" = $MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db.
    config.log.mlflow_tracking_uri = ""
    # Draw WORKDIR/curves.png (losses, learning rate, scores by step) at each eval and at the end.
    config.log.curves = True

    # ---------------------------------------------------------------- distributed
    # Several processes: set by hand, or left empty to detect SLURM / Cloud TPU pods.
    config.distributed = ml_collections.ConfigDict()
    # host:port of process 0 ("" = single process or auto-detected).
    config.distributed.coordinator_address = ""
    config.distributed.num_processes = 1
    config.distributed.process_id = 0
    # Call jax.distributed.initialize() (with its own detection of TPU pods, SLURM, Open MPI)
    # even when no multi-host environment is recognized here.
    config.distributed.force = False
    # CPU-only multi-process runs need a collectives backend: "gloo" (or "" on GPU/TPU).
    config.distributed.cpu_collectives = ""

    return config.lock()
