"""A trained reward model as an online RL reward (objectives/model_reward.py): scores equal
transformers' *ForSequenceClassification on the texts TRL would score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from chat_tokenizers import make_tokenizer

from sft_jax.core.errors import ConfigError
from sft_jax.objectives.rewards import rewards_from_config

PROMPTS = [
    [{"role": "user", "content": "add the numbers"}],
    [{"role": "user", "content": "the"}],
    [{"role": "user", "content": "numbers add numbers the add"}],
]
COMPLETIONS = [[{"role": "assistant", "content": text}] for text in ("the", "add add", "numbers")]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward_model")
    tokenizer = make_tokenizer("chatml")
    tokenizer.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    return path, model.eval(), tokenizer


def transformers_scores(model, tokenizer, texts: list[str]) -> np.ndarray:
    """TRL's GRPOTrainer._calculate_rewards for a model reward function."""
    inputs = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                       add_special_tokens=False)  # fmt: skip
    with torch.no_grad():
        return model(**inputs).logits[:, 0].numpy()


def test_a_reward_model_scores_chat_completions_as_transformers(reward_model_dir):
    path, model, tokenizer = reward_model_dir
    (reward,) = rewards_from_config(f"reward_model:{path}", "", 16)
    assert reward.name == f"reward_model:{path.name}"  # one part of rewards/<name>/mean
    ours = reward.fn(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3)
    texts = [
        tokenizer.apply_chat_template([*p, *c], tokenize=False)
        for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
    ]
    np.testing.assert_allclose(ours, transformers_scores(model, tokenizer, texts), rtol=1e-4)


def test_a_reward_model_scores_text_prompt_and_completion_joined(reward_model_dir):
    path, model, tokenizer = reward_model_dir
    (reward,) = rewards_from_config(f"reward_model:{path}", "", 16)
    prompts, completions = ["add the", "numbers"], [" numbers", " add the the"]
    ours = reward.fn(prompts=prompts, completions=completions, completion_ids=[[1]] * 2)
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    np.testing.assert_allclose(ours, transformers_scores(model, tokenizer, texts), rtol=1e-4)


def test_a_causal_lm_is_not_a_reward_model(hf_checkpoint, tmp_path):
    causal_dir = hf_checkpoint("llama3.1")[0]
    with pytest.raises(ConfigError, match="a causal LM, not a reward model"):
        rewards_from_config(f"reward_model:{causal_dir}", "", 16)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        rewards_from_config(f"reward_model:{tmp_path}", "", 16)
