"""Reward functions named by the GRPO tests as "grpo_rewards:NAME" (TRL's signature)."""


def even_tokens(prompts, completions, completion_ids, **columns):
    """The share of even token ids in each completion: differs within a group, so advantages
    and the loss are not zero even for a random model."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def not_a_number(prompts, completions, completion_ids, **columns):
    return [float("nan")] * len(completions)


def needs_answer(prompts, completions, completion_ids, answer, **columns):
    """1.0 where the completion holds the answer column's text (columns reach the rewards)."""
    return [float(str(a) in c) for a, c in zip(answer, completions, strict=True)]
