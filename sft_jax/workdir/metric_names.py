"""Every metric the trainer writes (metrics.jsonl, TensorBoard), with what it means: the one
list the metrics reference (docs/metrics.md, made by scripts/refresh_docs.py) is generated
from. `<name>` in a key stands for one part chosen at run time (a mixture source, a layer).

The writer (workdir/metrics.py) refuses a key missing here when $SFT_JAX_STRICT_METRICS is
set, as the test suite sets it: a new metric cannot ship undocumented.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str
    when: str  # which runs write it
    meaning: str


_TRAIN = "every log.every_steps updates"
_EVAL = "every eval"
_PAIRS = "objective dpo, simpo, orpo"
_ORPO = "objective orpo"
_REWARD = "objective reward"
_MOE = "mixtures of experts"
_RL = "objective grpo"
_ROLLOUT = "each update that samples a rollout (objective grpo, ppo)"
_PPO = "objective ppo"
_PPO_ROLLOUT = "each update that samples a rollout (objective ppo)"

METRICS: tuple[Metric, ...] = (
    Metric(
        "train/loss",
        _TRAIN,
        "the loss the update minimises (its objective's, plus the "
        "router's losses on a mixture of experts)",
    ),
    Metric("train/ce", f"{_TRAIN}; {_MOE}", "the cross-entropy alone, without the router's losses"),
    Metric(
        "train/z_loss",
        f"{_TRAIN}; SFT",
        "mean logsumexp(logits)^2 over the target tokens "
        "(added to the loss with train.z_loss_weight)",
    ),
    Metric("train/target_tokens", f"{_TRAIN}; SFT", "tokens that carry the loss in the batch"),
    Metric("train/grad_norm", _TRAIN, "global gradient norm before clipping"),
    Metric("train/learning_rate", _TRAIN, "the learning rate of the update"),
    Metric("train/step_seconds", _TRAIN, "wall time of the last update, data included"),
    Metric("train/tokens_per_sec", _TRAIN, "row tokens (padding included) per second"),
    Metric(
        "train/mfu",
        f"{_TRAIN}; devices of known peak (GPU, TPU, or log.peak_tflops_per_device)",
        "model FLOPs utilisation: achieved over peak FLOP/s per device",
    ),
    Metric("train/aux_loss", f"{_TRAIN}; {_MOE}", "the load-balancing loss (before its weight)"),
    Metric("train/router_z_loss", f"{_TRAIN}; {_MOE}", "mean logsumexp(router logits)^2"),
    Metric(
        "train/expert_load_max_over_mean/layer_<NN>",
        f"{_TRAIN}; {_MOE}",
        "tokens of the busiest expert over the mean, per MoE layer (1 is even)",
    ),
    Metric(
        "train/rewards/chosen",
        f"{_TRAIN}; {_PAIRS}",
        "mean implicit reward of the chosen replies (TRL's name)",
    ),
    Metric(
        "train/rewards/rejected",
        f"{_TRAIN}; {_PAIRS}",
        "mean implicit reward of the rejected replies",
    ),
    Metric(
        "train/rewards/accuracies",
        f"{_TRAIN}; {_PAIRS}",
        "share of pairs whose chosen reward is higher",
    ),
    Metric("train/rewards/margins", f"{_TRAIN}; {_PAIRS}", "mean chosen minus rejected reward"),
    Metric(
        "train/logps/chosen", f"{_TRAIN}; {_PAIRS}", "mean log-probability of the chosen replies"
    ),
    Metric(
        "train/logps/rejected",
        f"{_TRAIN}; {_PAIRS}",
        "mean log-probability of the rejected replies",
    ),
    Metric("train/nll", f"{_TRAIN}; {_PAIRS}", "NLL per token of the chosen replies"),
    Metric(
        "train/nll_loss",
        f"{_TRAIN}; {_ORPO}",
        "ORPO's NLL term (TRL's name): per token of the chosen sequences, prompt included "
        "(preference.orpo_nll=prompt_and_reply), or of the chosen replies (reply)",
    ),
    Metric(
        "train/log_odds_ratio",
        f"{_TRAIN}; {_ORPO}",
        "mean log sigmoid of the log odds ratio of chosen over rejected (TRL's name; the odds "
        "ratio loss is -beta times it)",
    ),
    Metric(
        "train/log_odds_chosen",
        f"{_TRAIN}; {_ORPO}",
        "mean log odds ratio of chosen over rejected, log odds(chosen) - log odds(rejected) "
        "(TRL's name)",
    ),
    Metric("train/pairs", f"{_TRAIN}; {_PAIRS}, {_REWARD}", "preference pairs in the batch"),
    Metric(
        "train/accuracy",
        f"{_TRAIN}; {_REWARD}",
        "share of pairs scored chosen > rejected (TRL RewardTrainer's name)",
    ),
    Metric("train/margin", f"{_TRAIN}; {_REWARD}", "mean chosen minus rejected score"),
    Metric("train/mean_reward", f"{_TRAIN}; {_REWARD}", "mean score of all replies"),
    Metric("train/min_reward", f"{_TRAIN}; {_REWARD}", "lowest score in the batch"),
    Metric("train/max_reward", f"{_TRAIN}; {_REWARD}", "highest score in the batch"),
    Metric(
        "train/reward",
        _ROLLOUT,
        "mean weighted reward of the rollout's completions (TRL's name, as all train/ metrics of "
        "online RL)",
    ),
    Metric("train/reward_std", _ROLLOUT, "mean std of the rewards in a group (batch: of all)"),
    Metric(
        "train/rewards/<name>/mean",
        _ROLLOUT,
        "mean of one reward function (named as in grpo.reward_funcs) where it applies",
    ),
    Metric("train/rewards/<name>/std", _ROLLOUT, "std of one reward function where it applies"),
    Metric(
        "train/frac_reward_zero_std",
        _ROLLOUT,
        "share of completions in groups whose rewards are all equal (advantage 0: no signal)",
    ),
    Metric("train/completions/mean_length", _ROLLOUT, "mean completion length, in tokens"),
    Metric("train/completions/min_length", _ROLLOUT, "shortest completion"),
    Metric("train/completions/max_length", _ROLLOUT, "longest completion"),
    Metric(
        "train/completions/clipped_ratio",
        _ROLLOUT,
        "share of completions cut at grpo.max_completion_length (no stop token)",
    ),
    Metric(
        "train/completions/mean_terminated_length",
        _ROLLOUT,
        "mean length of the completions that ended with a stop token",
    ),
    Metric("train/completions/min_terminated_length", _ROLLOUT, "shortest of those"),
    Metric("train/completions/max_terminated_length", _ROLLOUT, "longest of those"),
    Metric("train/num_tokens", _ROLLOUT, "prompt and completion tokens sampled so far, in all"),
    Metric(
        "train/sampling/sampling_logp_difference/mean",
        _ROLLOUT,
        "mean |log p| difference of the sampled tokens between the sampler and the training "
        "forward on the same params (the numerics gate)",
    ),
    Metric(
        "train/sampling/sampling_logp_difference/max",
        _ROLLOUT,
        "largest such difference (over grpo.max_sampling_logp_difference stops the run)",
    ),
    Metric(
        "train/sampling/importance_sampling_ratio/min",
        _ROLLOUT,
        "smallest p_train / p_sampler of a sampled token",
    ),
    Metric("train/sampling/importance_sampling_ratio/mean", _ROLLOUT, "mean of that ratio"),
    Metric("train/sampling/importance_sampling_ratio/max", _ROLLOUT, "largest of that ratio"),
    Metric(
        "train/entropy",
        _ROLLOUT,
        "mean entropy of the policy's next-token distribution (softmax(logits / temperature)) "
        "over the completion tokens, at the params that sampled them",
    ),
    Metric("train/time/sampling_s", _ROLLOUT, "seconds sampling the rollout"),
    Metric(
        "train/time/scoring_s",
        _ROLLOUT,
        "seconds scoring it: rewards, advantages, the log-prob pass, the completions log",
    ),
    Metric(
        "train/time/update_s",
        _ROLLOUT,
        "seconds from the previous rollout's end to this one's start: the updates in between",
    ),
    Metric("train/sampled_tokens_per_sec", _ROLLOUT, "completion tokens sampled per second"),
    Metric(
        "train/kl",
        f"{_TRAIN}; {_RL}",
        "mean k3 estimate of KL(policy || reference) over completion tokens (0 without beta)",
    ),
    Metric(
        "train/clip_ratio/low_mean",
        f"{_TRAIN}; {_RL}",
        "share of completion tokens (sequences, GSPO) whose ratio is clipped below",
    ),
    Metric("train/clip_ratio/high_mean", f"{_TRAIN}; {_RL}", "share clipped above"),
    Metric("train/clip_ratio/region_mean", f"{_TRAIN}; {_RL}", "share clipped either way"),
    Metric("train/completion_tokens", f"{_TRAIN}; {_RL}, ppo", "completion tokens in the update"),
    Metric(
        "train/objective/kl",
        _PPO_ROLLOUT,
        "mean over completions of the summed log-ratio to the reference (TRL PPOTrainer's "
        "names, as the other PPO metrics)",
    ),
    Metric("train/objective/non_score_reward", _PPO_ROLLOUT, "mean of -kl_coef x that sum"),
    Metric("train/objective/scores", _PPO_ROLLOUT, "mean score (weighted rewards) per completion"),
    Metric("train/objective/rlhf_reward", _PPO_ROLLOUT, "mean score plus non-score reward"),
    Metric("train/val/mean", _PPO_ROLLOUT, "the value head's mean estimate at sampling time"),
    Metric("train/loss/policy_avg", f"{_TRAIN}; {_PPO}", "the clipped policy loss per token"),
    Metric("train/loss/value_avg", f"{_TRAIN}; {_PPO}", "the clipped value loss per token"),
    Metric(
        "train/policy/clipfrac_avg", f"{_TRAIN}; {_PPO}", "share of tokens the ratio's clip decided"
    ),
    Metric("train/val/clipfrac_avg", f"{_TRAIN}; {_PPO}", "share of tokens the value clip decided"),
    Metric("train/val/vpred", f"{_TRAIN}; {_PPO}", "the value head's mean estimate in the update"),
    Metric("eval/loss", _EVAL, "the objective's loss over the whole eval set"),
    Metric("eval/perplexity", f"{_EVAL}; SFT", "exp(eval/loss)"),
    Metric("eval/target_tokens", f"{_EVAL}; SFT", "tokens that carry the loss in the eval set"),
    Metric("eval/best_loss", _EVAL, "lowest eval/loss so far"),
    Metric("eval/best_step", _EVAL, "the step of eval/best_loss (online RL: eval/best_reward)"),
    Metric(
        "eval/exact_match",
        f"{_EVAL}; eval.generate_examples > 0",
        "share of greedy replies equal to the reference",
    ),
    Metric("eval/generated", f"{_EVAL}; eval.generate_examples > 0", "replies generated"),
    Metric(
        "eval/samples",
        f"{_EVAL}; eval.show_samples > 0",
        "the shown replies next to their references (text; TensorBoard's text tab)",
    ),
    Metric("eval/rewards/chosen", f"{_EVAL}; {_PAIRS}", "as train/rewards/chosen, on eval"),
    Metric("eval/rewards/rejected", f"{_EVAL}; {_PAIRS}", "as train/rewards/rejected, on eval"),
    Metric("eval/rewards/accuracies", f"{_EVAL}; {_PAIRS}", "as train/rewards/accuracies"),
    Metric("eval/rewards/margins", f"{_EVAL}; {_PAIRS}", "as train/rewards/margins"),
    Metric("eval/logps/chosen", f"{_EVAL}; {_PAIRS}", "as train/logps/chosen"),
    Metric("eval/logps/rejected", f"{_EVAL}; {_PAIRS}", "as train/logps/rejected"),
    Metric("eval/nll", f"{_EVAL}; {_PAIRS}", "as train/nll"),
    Metric("eval/nll_loss", f"{_EVAL}; {_ORPO}", "as train/nll_loss"),
    Metric("eval/log_odds_ratio", f"{_EVAL}; {_ORPO}", "as train/log_odds_ratio"),
    Metric("eval/log_odds_chosen", f"{_EVAL}; {_ORPO}", "as train/log_odds_chosen"),
    Metric("eval/pairs", f"{_EVAL}; {_PAIRS}, {_REWARD}", "preference pairs in the eval set"),
    Metric("eval/accuracy", f"{_EVAL}; {_REWARD}", "as train/accuracy"),
    Metric("eval/margin", f"{_EVAL}; {_REWARD}", "as train/margin"),
    Metric("eval/mean_reward", f"{_EVAL}; {_REWARD}", "as train/mean_reward"),
    Metric("eval/min_reward", f"{_EVAL}; {_REWARD}", "as train/min_reward"),
    Metric("eval/max_reward", f"{_EVAL}; {_REWARD}", "as train/max_reward"),
    Metric(
        "eval/reward",
        f"{_EVAL}; {_RL}",
        "mean weighted reward of greedy replies to the held-out prompts (highest: the best step)",
    ),
    Metric(
        "eval/pass@1",
        f"{_EVAL}; {_RL}",
        "share of held-out prompts whose greedy reply scores 1.0 or more by the first reward "
        "function (the verifier)",
    ),
    Metric(
        "eval/pass@k",
        f"{_EVAL}; {_RL}, grpo.eval_samples = k > 0",
        "share of held-out prompts with at least one of k sampled replies passing",
    ),
    Metric("eval/rewards/<name>/mean", f"{_EVAL}; {_RL}", "one reward function's mean, greedy"),
    Metric("eval/completions/mean_length", f"{_EVAL}; {_RL}", "mean greedy reply length"),
    Metric("eval/best_reward", f"{_EVAL}; {_RL}", "highest eval/reward so far"),
    Metric(
        "harness/<task>/<metric>",
        f"{_EVAL}; eval.harness_tasks",
        "an lm-evaluation-harness task's metric on the live model (e.g. harness/arc_easy/acc; "
        "a filtered one as <metric>_<filter>, e.g. harness/gsm8k/exact_match_strict-match)",
    ),
    Metric(
        "eval/<source>/<metric>",
        f"{_EVAL}; data.mixture sources with eval files",
        "an eval metric of that source's eval set alone (e.g. eval/math/loss)",
    ),
)


def _pattern(key: str) -> re.Pattern[str]:
    """<metric> stands for any metric's own key (slashes and all), other <names> for one part."""
    pieces = re.split(r"(<[A-Za-z]+>)", key)
    return re.compile(
        "".join(
            (".+" if piece == "<metric>" else "[^/]+")
            if piece.startswith("<")
            else re.escape(piece)
            for piece in pieces
        )
        + r"\Z"
    )


_PATTERNS = [_pattern(metric.key) for metric in METRICS]


def documented(key: str) -> bool:
    return key == "step" or any(pattern.match(key) for pattern in _PATTERNS)
