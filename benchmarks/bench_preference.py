"""A DPO step's throughput relative to an SFT step on the same tokens; TRL + PyTorch the same.

  python benchmarks/bench_preference.py --batch=8 --seq=256 --steps=5
  python benchmarks/bench_preference.py --lora_rank=0 --no_torch   # full fine-tuning references

One random Llama-shaped model (transformers writes it to a temp directory; both sides load it),
LoRA of rank --lora_rank on every linear projection (the DPO reference is the model with its
adapters off on both sides: sft_jax.adapters.lora.adapters_off, peft's disable_adapter). Each
row holds one pair: a prompt + chosen reply and the same prompt + rejected reply (--seq / 2
tokens each, the replies half of each), so the DPO and SFT steps see the very same rows and
tokens; SFT trains the same completion tokens. sft_jax: the compiled train step with the
PairObjective vs CrossEntropy; PyTorch: trl.DPOTrainer._compute_loss (its fused LM head,
reference forward under no_grad with the adapters off) + backward + AdamW vs the model's own
loss on the same tokens.
With --lora_rank=0 every weight trains and sft_jax's DPO runs twice, with
preference.reference='copy' (a frozen copy of the weights, a reference forward per step) and
'precomputed' (the reference log-probs read from the batch: no reference forward).
Reported: tokens/s of each (mean of --steps after one warm-up), DPO / SFT ratios per side, one
JSON line. On CPU only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import types
from collections import defaultdict

import jax
import numpy as np
import torch
import transformers

from sft_jax.adapters.lora import LoRASpec, apply_lora, trainable_filter
from sft_jax.core.batch import REFERENCE_KEY
from sft_jax.data.batches import make_rows
from sft_jax.models import from_pretrained
from sft_jax.objectives.preference import PairObjective, PreferenceSpec, attach_frozen_copy
from sft_jax.train import sharding
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.optim import make_optimizer
from sft_jax.train.step import StepOptions


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="rows (= pairs) per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (one pair)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch / TRL side")
    args = parser.parse_args()
    if not args.lora_rank and not args.no_torch:
        parser.error("--lora_rank=0 compares sft_jax's DPO references only: add --no_torch.")
    return args


def pair_documents(args: argparse.Namespace) -> list[tuple[np.ndarray, np.ndarray]]:
    """2 documents per row of --seq / 2 tokens: prompt (first half) + reply (second half)."""
    rng = np.random.default_rng(0)
    half = args.seq // 2
    docs = []
    for _ in range(args.batch):
        prompt = rng.integers(3, args.vocab, half // 2)
        for _side in range(2):
            reply = rng.integers(3, args.vocab, half - half // 2)
            docs.append((np.concatenate([prompt, reply]), np.arange(half) >= half // 2))
    return docs


class _Docs:
    def __init__(self, docs):
        self.docs = docs

    def document(self, index):
        return self.docs[index]


def time_jax(args: argparse.Namespace, checkpoint: str, docs: list, reference: str) -> float:
    """tokens/s of sft_jax's SFT step (reference "") or DPO step with that reference."""
    import ml_collections

    mesh = sharding.single_device_mesh()
    model = from_pretrained(checkpoint, mesh=mesh)
    spec = LoRASpec(rank=args.lora_rank, alpha=16.0)
    if spec.enabled:
        apply_lora(model, spec, mesh)
    trainable = trainable_filter(spec)
    train = {"steps": 100, "learning_rate": 1e-4, "warmup_steps": 0, "lr_schedule": "constant",
             "min_lr_ratio": 1.0, "weight_decay": 0.0, "adam_b1": 0.9, "adam_b2": 0.95,
             "adam_eps": 1e-8, "max_grad_norm": 1.0}  # fmt: skip
    tx, schedule = make_optimizer(ml_collections.ConfigDict(train))
    state, shardings = init_state(model, tx, mesh, trainable)
    objective = None
    if reference:
        objective = PairObjective(PreferenceSpec("sigmoid", beta=0.1), reference, 1)
    if reference == "copy":
        attach_frozen_copy(model)
    steps = build_steps(
        model, tx, schedule, mesh, shardings, train_rows=args.batch, eval_rows=args.batch,
        seq_len=args.seq, options=StepOptions(), trainable=trainable, objective=objective,
    )  # fmt: skip
    rows = make_rows(_Docs(docs), [[2 * r, 2 * r + 1] for r in range(args.batch)], args.seq)
    if reference == "precomputed":  # the values do not change the work
        rows[REFERENCE_KEY] = np.full(rows["target_ids"].shape, -1.0, np.float32)
    batch = sharding.device_batch(rows, steps.batch_shardings)
    state, metrics = steps.train(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = steps.train(state, batch)
    jax.block_until_ready(metrics)
    return args.batch * args.seq * args.steps / (time.perf_counter() - start)


def _torch_model(checkpoint: str, rank: int, fused: bool):
    import peft

    model = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, attn_implementation="sdpa"
    )
    if fused:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    config = peft.LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(model.float(), config).train()


def time_torch(args: argparse.Namespace, checkpoint: str, docs: list, dpo: bool) -> float:
    model = _torch_model(checkpoint, args.lora_rank, fused=dpo)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    chosen, rejected = docs[0::2], docs[1::2]
    ids = torch.as_tensor(np.stack([t for t, _ in chosen + rejected]), dtype=torch.long)
    completion = torch.as_tensor(np.stack([m for _, m in chosen + rejected]), dtype=torch.long)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "completion_mask": completion}  # fmt: skip
    if dpo:
        from trl import DPOTrainer

        accelerator = types.SimpleNamespace(device="cpu", gather=lambda x: x,
                                            gather_for_metrics=lambda x: x,
                                            unwrap_model=lambda m: m)  # fmt: skip
        trainer = types.SimpleNamespace(
            model=model, ref_model=None, accelerator=accelerator, aux_loss_enabled=False,
            ld_alpha=None, precompute_ref_logps=False, f_divergence_type="reverse_kl",
            loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1, label_smoothing=0.0,
            use_weighting=False, _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
            _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        )  # fmt: skip

        def loss() -> torch.Tensor:
            return DPOTrainer._compute_loss(trainer, model, inputs, False)
    else:
        labels = ids.masked_fill(completion == 0, -100)

        def loss() -> torch.Tensor:
            return model(input_ids=ids, labels=labels).loss

    def step() -> None:
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.batch * args.seq * args.steps / (time.perf_counter() - start)


def main() -> None:
    args = parse()
    hf_config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    docs = pair_documents(args)
    with tempfile.TemporaryDirectory() as checkpoint:
        transformers.AutoModelForCausalLM.from_config(hf_config).save_pretrained(checkpoint)
        references = {"sft": "", "dpo": "adapters_off"}
        if not args.lora_rank:
            references = {"sft": "", "dpo": "copy", "dpo_precomputed": "precomputed"}
        result = {f"sft_jax_{k}": time_jax(args, checkpoint, docs, reference)
                  for k, reference in references.items()}  # fmt: skip
        if not args.no_torch:
            torch.manual_seed(0)
            result |= {f"torch_{k}": time_torch(args, checkpoint, docs, k == "dpo")
                       for k in ("sft", "dpo")}  # fmt: skip
    for name, value in result.items():
        print(f"{name:>14}: {value:10.0f} tokens/s")
    result["sft_jax_dpo_over_sft"] = result["sft_jax_dpo"] / result["sft_jax_sft"]
    print(f"sft_jax DPO / SFT tokens/s: {result['sft_jax_dpo_over_sft']:.3f}")
    if "sft_jax_dpo_precomputed" in result:
        result["sft_jax_precomputed_over_sft"] = (
            result["sft_jax_dpo_precomputed"] / result["sft_jax_sft"]
        )
        result["sft_jax_precomputed_over_copy"] = (
            result["sft_jax_dpo_precomputed"] / result["sft_jax_dpo"]
        )
        print(f"sft_jax DPO precomputed / SFT: {result['sft_jax_precomputed_over_sft']:.3f}, "
              f"/ DPO copy: {result['sft_jax_precomputed_over_copy']:.3f}")  # fmt: skip
    if "torch_dpo" in result:
        result["torch_dpo_over_sft"] = result["torch_dpo"] / result["torch_sft"]
        result["sft_jax_dpo_over_trl_dpo"] = result["sft_jax_dpo"] / result["torch_dpo"]
        print(f"TRL + PyTorch DPO / SFT tokens/s: {result['torch_dpo_over_sft']:.3f}")
        print(f"sft_jax DPO / TRL DPO tokens/s: {result['sft_jax_dpo_over_trl_dpo']:.3f}")
    print(json.dumps({**vars(args), **result}))


if __name__ == "__main__":
    main()
