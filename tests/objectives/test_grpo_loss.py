"""The GRPO family's losses and advantages equal TRL 1.16's (GRPOTrainer._compute_loss and the
advantages of _generate_and_score_completions) on the same tiny model, rollouts, rewards and
old / reference log-probs: the loss and the gradient norm, rel 1e-4."""

from __future__ import annotations

import collections
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import trl
from flax import nnx
from test_step import run_steps, tiny_model
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

from sft_jax.core.errors import ConfigError
from sft_jax.generation.sampler import rollout
from sft_jax.models.io.hf import from_pretrained
from sft_jax.objectives import grpo, grpo_sampling
from sft_jax.objectives.loss import token_logps
from sft_jax.train import sharding

assert trl.__version__.startswith("1.16"), "the reference is TRL 1.16"
PROMPT, COMPLETION, ROWS, G = 5, 7, 8, 4  # 2 prompts x 4 completions, one sequence a row
SEQ = PROMPT + COMPLETION + 1  # room for the label shift


def rollouts(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Prompts of PROMPT tokens, completions of 2..COMPLETION tokens (right padding)."""
    rng = np.random.default_rng(seed)
    prompts = np.repeat(rng.integers(3, vocab, (ROWS // G, PROMPT)), G, axis=0)
    lengths = rng.integers(2, COMPLETION + 1, ROWS)
    completions = rng.integers(3, vocab, (ROWS, COMPLETION))
    completion_mask = np.arange(COMPLETION)[None, :] < lengths[:, None]
    return {
        "prompt_ids": prompts,
        "completion_ids": np.where(completion_mask, completions, 0),
        "completion_mask": completion_mask,
    }


def our_batch(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One row per sequence: prompt, completion, padding; target_mask on the completion."""
    rows = len(data["prompt_ids"])
    tokens = np.concatenate([data["prompt_ids"], data["completion_ids"]], axis=1)
    real = np.concatenate([np.ones_like(data["prompt_ids"], bool), data["completion_mask"]], 1)
    input_ids = np.zeros((rows, SEQ), np.int32)
    input_ids[:, : tokens.shape[1]] = np.where(real, tokens, 0)
    segment_ids = np.zeros((rows, SEQ), np.int32)
    segment_ids[:, : tokens.shape[1]] = real
    target_ids = np.zeros_like(input_ids)
    target_ids[:, :-1] = input_ids[:, 1:]
    target_mask = np.zeros((rows, SEQ), bool)
    target_mask[:, PROMPT - 1 : PROMPT - 1 + COMPLETION] = data["completion_mask"]
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (rows, SEQ)).copy()
    return {
        "input_ids": input_ids,
        "target_ids": target_ids,
        "target_mask": target_mask,
        "positions": positions,
        "segment_ids": segment_ids,
    }


def completion_part(x_BxT: np.ndarray) -> np.ndarray:
    """Our [B, T] per-target values at the completion's tokens: TRL's [B, C] layout."""
    return np.asarray(x_BxT)[:, PROMPT - 1 : PROMPT - 1 + COMPLETION]


def trl_stub(
    args: grpo.GRPOSpec, model: torch.nn.Module, accumulation: int, correction: bool = False
) -> types.SimpleNamespace:
    """What GRPOTrainer._compute_loss reads of its trainer, for one process."""

    def per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **_):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits[:, -logits_to_keep - 1 : -1].float()
        logps = torch.log_softmax(logits, -1)
        chosen = torch.gather(logps, -1, input_ids[:, -logits_to_keep:, None])[..., 0]
        entropy = -(logps.exp() * logps).sum(-1)
        return chosen, entropy, None

    accelerator = types.SimpleNamespace(
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        reduce=lambda x, reduction: x,
        num_processes=1,
        sync_gradients=True,
    )
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=per_token_logps_and_entropies,
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=args.importance_sampling_level,
        beta=args.beta,
        args=types.SimpleNamespace(
            use_bias_correction_kl=False,
            delta=args.delta or None,
            steps_per_generation=accumulation,
        ),
        loss_type=args.loss_type,
        epsilon_low=args.epsilon,
        epsilon_high=args.high,
        use_vllm=correction,
        vllm_importance_sampling_correction=correction,
        model=model,
        current_gradient_accumulation_steps=accumulation,
        max_completion_length=args.max_completion_length,
        accelerator=accelerator,
        _entropy_bonus_enabled=False,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
    )


def trl_loss_and_grad_norm(
    spec, torch_model, data, old, ref, advantages, accumulation, is_ratio=None
):
    """is_ratio [B, C]: the sampler-mismatch weights TRL computes with vLLM's log-probs."""
    torch_model.train()
    torch_model.zero_grad()
    stub = trl_stub(spec, torch_model, accumulation, correction=is_ratio is not None)
    total = 0.0
    for k in range(accumulation):
        rows = np.arange(k, ROWS, accumulation)  # our micro-batch k: rows k, k + K, ...
        inputs = {
            "prompt_ids": torch.tensor(data["prompt_ids"][rows]),
            "prompt_mask": torch.ones(len(rows), PROMPT, dtype=torch.long),
            "completion_ids": torch.tensor(data["completion_ids"][rows]),
            "completion_mask": torch.tensor(data["completion_mask"][rows].astype(np.int64)),
            "advantages": torch.tensor(advantages[rows], dtype=torch.float32),
            "old_per_token_logps": None if old is None else torch.tensor(old[rows]),
            "ref_per_token_logps": None if ref is None else torch.tensor(ref[rows]),
            "num_items_in_batch": torch.tensor(float(data["completion_mask"].sum())),
        }
        if is_ratio is not None:
            inputs["importance_sampling_ratio"] = torch.tensor(is_ratio[rows])
        loss = GRPOTrainer._compute_loss(stub, torch_model, inputs)
        loss.backward()
        total += float(loss.detach())
    norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in torch_model.parameters()))
    return total, norm


def our_loss_and_grad_norm(spec, model, batch, accumulation):
    objective = grpo.GRPOObjective(spec, loss_chunk_size=SEQ)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    normalizer = objective.normalizer(batch)

    def loss_of(model):
        # The train step's micro-batch k holds rows k, k + K, ... (train/step.micro_batches).
        parts = [{key: x[k::accumulation] for key, x in batch.items()} for k in range(accumulation)]
        sums = [objective.sums(model, part) for part in parts]
        return objective.loss(jax.tree.map(lambda *xs: sum(xs), *sums), normalizer)

    loss, grads = nnx.value_and_grad(loss_of)(model)
    norm = math.sqrt(
        sum(float(np.sum(np.square(np.asarray(g, np.float64)))) for g in jax.tree.leaves(grads))
    )
    return float(loss), norm


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    path, torch_model = hf_checkpoint("llama3.1")
    torch_model = torch_model.float()
    return from_pretrained(path), torch_model


CASES = [
    (loss_type, level, iteration, accumulation, beta)
    for loss_type in grpo.LOSS_TYPES
    for level in grpo.IMPORTANCE_SAMPLING_LEVELS
    for iteration, accumulation, beta in ((1, 1, 0.0), (2, 2, 0.04))
]


@pytest.mark.parametrize("loss_type, level, iteration, accumulation, beta", CASES)
def test_loss_and_gradient_norm_equal_trl(models, loss_type, level, iteration, accumulation, beta):
    """Iteration 1: the rollouts' own policy (ratio 1); iteration 2 (TRL's num_iterations=2):
    the policy moved since sampling, here old log-probs set apart from the current ones."""
    model, torch_model = models
    spec = grpo.GRPOSpec(
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon=0.2,
        epsilon_high=5.0 if loss_type == "cispo" else 0.28,
        beta=beta,
        max_completion_length=COMPLETION,
        accumulation=accumulation,
    )
    data = rollouts(model.config.vocab_size)
    batch = our_batch(data)
    rng = np.random.default_rng(1)
    current = np.asarray(token_logps(model, {k: jnp.asarray(v) for k, v in batch.items()}, SEQ))
    shift = rng.normal(0.0, 0.3, current.shape) * (iteration == 2)
    old_BxT = np.where(batch["target_mask"], current + shift, 0.0).astype(np.float32)
    ref_BxT = np.where(batch["target_mask"], current - rng.normal(0, 0.2, current.shape), 0.0)
    advantages = rng.normal(0.0, 1.0, ROWS).astype(np.float32)
    batch |= {
        grpo.OLD_LOGPS_KEY: old_BxT,
        grpo.ADVANTAGE_KEY: advantages,
        "reference_logps": ref_BxT.astype(np.float32),
    }
    ours = our_loss_and_grad_norm(spec, model, batch, accumulation)
    theirs = trl_loss_and_grad_norm(
        spec,
        torch_model,
        data,
        completion_part(old_BxT) if iteration == 2 else None,
        completion_part(ref_BxT).astype(np.float32) if beta else None,
        advantages,
        accumulation,
    )
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_correction_weights_by_mode():
    """TRL's four modes on hand-worked log-prob differences (clip_max 3, clip_min 0.5)."""
    mask = np.array([[True, True, False], [True, True, True]])
    sampler = np.zeros((2, 3))
    train = np.log([[4.0, 0.25, 9.0], [1.5, 1.0, 1.0]])  # d = log of these (row 0, col 2: off)
    weights = {
        mode: grpo_sampling.correction_weights(sampler, train, mask, mode, 0.5, 3.0)
        for mode in grpo_sampling.MODES
    }
    np.testing.assert_allclose(weights["token_truncate"], [[3, 0.5, 0], [1.5, 1, 1]], rtol=1e-6)
    np.testing.assert_allclose(weights["token_mask"], [[0, 0, 0], [1.5, 1, 1]], rtol=1e-6)
    # sequences: exp(sum d) = 1.0 (row 0: 4 x 0.25) and 1.5
    np.testing.assert_allclose(weights["sequence_truncate"], [[1, 1, 0], [1.5] * 3], rtol=1e-6)
    np.testing.assert_allclose(weights["sequence_mask"], [[1, 1, 0], [1.5] * 3], rtol=1e-6)
    unbounded = grpo_sampling.correction_weights(sampler, train, mask, "token_truncate", 0, 0)
    np.testing.assert_allclose(unbounded, [[4, 0.25, 0], [1.5, 1, 1]], rtol=1e-6)
    metrics = grpo_sampling.sampling_metrics(
        sampler, train, mask, weights["sequence_mask"], "sequence_mask"
    )
    assert metrics["sampling/importance_sampling_ratio/min"] == pytest.approx(1.0)
    assert metrics["sampling/importance_sampling_ratio/max"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    "loss_type, level, mode",
    [("dapo", "token", "token_truncate"), ("grpo", "sequence", "sequence_mask")],
)
def test_the_sampler_correction_equals_trl(models, loss_type, level, mode):
    """TRL's vllm_importance_sampling_correction: each token's policy loss times the
    sampler-mismatch weight, the KL term not; num_iterations 2, accumulation 2, beta."""
    model, torch_model = models
    spec = grpo.GRPOSpec(
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_high=0.28,
        beta=0.04,
        max_completion_length=COMPLETION,
        accumulation=2,
        importance_sampling_correction=True,
    )
    data = rollouts(model.config.vocab_size, seed=3)
    batch = our_batch(data)
    rng = np.random.default_rng(4)
    current = np.asarray(token_logps(model, {k: jnp.asarray(v) for k, v in batch.items()}, SEQ))
    mask = batch["target_mask"]
    old_BxT = np.where(mask, current + rng.normal(0.0, 0.3, current.shape), 0.0)
    sampler_BxT = np.where(mask, old_BxT + rng.normal(0.0, 0.5, current.shape), 0.0)
    ref_BxT = np.where(mask, current - rng.normal(0, 0.2, current.shape), 0.0)
    weights = grpo_sampling.correction_weights(sampler_BxT, old_BxT, mask, mode, 0.0, 3.0)
    assert np.sum(weights[mask] != 1.0) > 0 and np.all(weights[~mask] == 0)
    advantages = rng.normal(0.0, 1.0, ROWS).astype(np.float32)
    batch |= {
        grpo.OLD_LOGPS_KEY: old_BxT.astype(np.float32),
        grpo.ADVANTAGE_KEY: advantages,
        "reference_logps": ref_BxT.astype(np.float32),
        grpo_sampling.IS_RATIO_KEY: weights,
    }
    ours = our_loss_and_grad_norm(spec, model, batch, 2)
    theirs = trl_loss_and_grad_norm(
        spec,
        torch_model,
        data,
        completion_part(old_BxT).astype(np.float32),
        completion_part(ref_BxT).astype(np.float32),
        advantages,
        2,
        completion_part(weights),
    )
    assert ours == pytest.approx(theirs, rel=1e-4)


def trl_advantages(rewards, weights, num_generations, scale_rewards):
    """_generate_and_score_completions' sum_then_normalize, on the same tensors."""
    rewards_per_func = torch.tensor(rewards, dtype=torch.float32)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    total = (rewards_per_func * torch.tensor(weights, dtype=torch.float32)[None]).nansum(dim=1)
    total[unscorable] = torch.nan
    mean = torch.nanmean(total.view(-1, num_generations), dim=1)
    mean = mean.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(total.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    else:
        std = nanstd(total).expand_as(total)
    advantages = total - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0).numpy(), zero.numpy()


@pytest.mark.parametrize("scale_rewards", grpo.SCALE_REWARDS)
def test_advantages_equal_trl(scale_rewards):
    rng = np.random.default_rng(2)
    rewards = rng.integers(0, 3, (12, 2)).astype(np.float64)  # 3 prompts x 4, two functions
    rewards[0:4, 0] = 1.0  # a flat group on the first function
    rewards[4:8] = [[1.0, 2.0]] * 4  # a group whose total is flat: zero std
    rewards[9, :] = np.nan  # a completion no function scores
    rewards[10, 1] = np.nan  # one that only the first scores
    ours, total, zero = grpo.advantages(rewards, np.array([1.0, 0.5]), 4, scale_rewards)
    theirs, their_zero = trl_advantages(rewards, [1.0, 0.5], 4, scale_rewards)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(zero, their_zero)
    assert ours[9] == 0.0 and np.isnan(total[9])
    if scale_rewards != "batch":  # the group whose total is flat: zero std, no advantage
        assert zero[4:8].all() and np.all(ours[4:8] == 0.0)


def test_one_completion_per_prompt_is_refused():
    """Its group mean is itself: every advantage would be 0, in any scale_rewards mode."""
    for scale_rewards in grpo.SCALE_REWARDS:
        with pytest.raises(ConfigError, match=r"num_generations=1: a group of one .* at least 2"):
            grpo.advantages(np.ones((4, 1)), np.ones(1), 1, scale_rewards)
    trl_zero, _ = trl_advantages(np.arange(4.0)[:, None], [1.0], 1, "batch")
    assert np.all(trl_zero == 0.0)  # what TRL would train on


def compiled_history(mesh, batch: dict[str, np.ndarray], spec: grpo.GRPOSpec, steps: int = 2):
    """train/loss, train/grad_norm, ... of `steps` compiled train steps on the same batch
    (TRL's num_iterations: the rollouts reused while the policy moves)."""
    history, _, _ = run_steps(
        mesh,
        [batch] * steps,
        accumulation=spec.accumulation,
        rows=ROWS,
        seq_len=SEQ,
        loss_chunk_size=SEQ,
        objective=grpo.GRPOObjective(spec, loss_chunk_size=SEQ),
    )
    return [{k: float(v) for k, v in metrics.items()} for metrics in history]


def test_the_compiled_step_on_a_mesh_equals_one_device_and_the_reference_loss():
    """The GRPO objective in the jitted, sharded train step (fsdp 4 x tensor 2 of 8 devices,
    2 micro-batches, a per-row advantage): the same losses and gradient norms as one device,
    and the first step's as the loss above that equals TRL's."""
    spec = grpo.GRPOSpec(
        loss_type="grpo", beta=0.04, max_completion_length=COMPLETION, accumulation=2
    )
    model = tiny_model()
    batch = our_batch(rollouts(model.config.vocab_size, seed=3))
    current = np.asarray(token_logps(model, {k: jnp.asarray(v) for k, v in batch.items()}, SEQ))
    rng = np.random.default_rng(4)
    batch |= {
        grpo.OLD_LOGPS_KEY: np.where(batch["target_mask"], current, 0.0).astype(np.float32),
        grpo.ADVANTAGE_KEY: rng.normal(0.0, 1.0, ROWS).astype(np.float32),
        "reference_logps": np.where(batch["target_mask"], current - 0.1, 0.0).astype(np.float32),
    }
    one = compiled_history(sharding.single_device_mesh(), batch, spec)
    eight = compiled_history(sharding.make_mesh(1, 4, 2), batch, spec)
    for key in ("train/loss", "train/grad_norm", "train/kl", "train/clip_ratio/region_mean"):
        np.testing.assert_allclose([m[key] for m in eight], [m[key] for m in one], rtol=2e-5)
    assert one[1]["train/clip_ratio/region_mean"] >= 0.0 and one[0]["train/completion_tokens"] > 0
    eager = our_loss_and_grad_norm(spec, tiny_model(), batch, spec.accumulation)
    assert (one[0]["train/loss"], one[0]["train/grad_norm"]) == pytest.approx(eager, rel=1e-5)


def test_the_numerics_gate_passes_the_sampler_and_stops_a_perturbed_one(models):
    """The rollout's log-probs of its own tokens against the training forward's (the chunked
    loss path) on the same params: a gap at float32 rounding; a sampler off by a temperature
    trips the gate with the step and the figures."""
    model, _ = models
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(3, model.config.vocab_size, PROMPT)) for _ in range(4)]
    out = rollout(model, prompts, max_new_tokens=COMPLETION, stop_token_ids=[], temperature=1.0)
    data = {
        "prompt_ids": np.array(prompts),
        "completion_ids": np.array(out.tokens),
        "completion_mask": np.ones((4, COMPLETION), bool),
    }
    rows = our_batch(data)
    train = np.asarray(token_logps(model, {k: jnp.asarray(v) for k, v in rows.items()}, SEQ))
    sampler = np.zeros_like(train)
    sampler[:, PROMPT - 1 : PROMPT - 1 + COMPLETION] = np.array(out.logps)
    mask = rows["target_mask"]
    healthy = grpo_sampling.sampling_metrics(sampler, train, mask)
    assert healthy["sampling/sampling_logp_difference/max"] < 1e-4
    assert healthy["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-4)
    grpo_sampling.check_sampling(7, healthy, max_difference=1e-3)
    hotter = rollout(model, prompts, max_new_tokens=COMPLETION, stop_token_ids=[], temperature=1.5)
    data["completion_ids"] = np.array(hotter.tokens)
    rows = our_batch(data)
    train = np.asarray(token_logps(model, {k: jnp.asarray(v) for k, v in rows.items()}, SEQ))
    sampler[:, PROMPT - 1 : PROMPT - 1 + COMPLETION] = np.array(hotter.logps)
    perturbed = grpo_sampling.sampling_metrics(sampler, train, mask)
    with pytest.raises(
        grpo_sampling.SamplerDivergedError, match=r"step 7: .* differ .* by up to [0-9.]+"
    ):
        grpo_sampling.check_sampling(7, perturbed, max_difference=1e-3)
