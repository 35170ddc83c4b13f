"""A trained reward model as an online RL reward: `grpo.reward_funcs = "reward_model:DIR"`.

DIR is a reward model's export (`train.objective="reward"`: a *ForSequenceClassification
directory with one label, its tokenizer and chat template beside it). Each completion is scored
as TRL scores with a model reward function: a chat prompt and its completion rendered together
by the reward model's chat template (a text prompt: prompt + completion), tokenized without
special tokens added, right-padded, and the score read at the last token that is not the pad
token (transformers' rule).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.core.errors import ConfigError
from sft_jax.data.templates import load_tokenizer
from sft_jax.models import from_pretrained
from sft_jax.objectives.reward import last_token_index

PREFIX = "reward_model:"  # grpo.reward_funcs names a reward model's export as PREFIX + DIR


@jax.jit
def _scores(graphdef: nnx.GraphDef, state: nnx.State, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, state)
    hidden_BxTxD, _ = model.forward(batch["input_ids"], batch["positions"], batch["segment_ids"])
    scores_BxT = model.scores(hidden_BxTxD)[..., 0]
    last_B = last_token_index(batch, 1, batch["pad_id"])[:, 0]
    return jnp.take_along_axis(scores_BxT, jnp.maximum(last_B, 0)[:, None], axis=1)[:, 0]


def check(directory: str) -> Path:
    """The export's path, once its config.json says it is a reward model (nothing loaded)."""
    path = Path(directory).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(
            f"reward {PREFIX}{directory}: no config.json there; name the export of a "
            "train.objective='reward' run (python -m sft_jax.export --workdir=RUN)."
        )
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(
            f"reward {PREFIX}{directory}: a causal LM, not a reward model (its config.json "
            f"names {architectures}, no *ForSequenceClassification)."
        )
    return path


class ModelReward:
    """The reward function of a reward model's export (TRL's signature)."""

    def __init__(self, directory: str, batch_size: int = 32):
        path = check(directory)
        self.model = from_pretrained(path)
        self.tokenizer = load_tokenizer(path)
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.model.config.hf_config.get("pad_token_id")
        if self.pad_id is None:
            raise ConfigError(
                f"reward {PREFIX}{directory}: neither its tokenizer nor config.json names a pad "
                "token, and the score is read at the last token before the padding."
            )
        self.batch_size = batch_size

    def texts(self, prompts: list[Any], completions: list[Any]) -> list[str]:
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, str):
                text = completion if isinstance(completion, str) else completion[0]["content"]
                out.append(prompt + text)
            else:
                messages = [*prompt, *completion]
                out.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
        return out

    def __call__(self, prompts, completions, completion_ids, **columns) -> list[float]:
        ids = [
            self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in self.texts(prompts, completions)
        ]
        graphdef, state = nnx.split(self.model)
        scores: list[float] = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            scores += np.asarray(_scores(graphdef, state, self._batch(chunk)))[
                : len(chunk)
            ].tolist()
        return scores

    def _batch(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """Right-padded rows, the length rounded up to a multiple of 64 (few compilations)."""
        length = -(-max(len(r) for r in rows) // 64) * 64
        input_ids = np.full((self.batch_size, length), self.pad_id, np.int32)
        segment_ids = np.zeros((self.batch_size, length), np.int32)
        for index, row in enumerate(rows):
            input_ids[index, : len(row)] = row
            segment_ids[index, : len(row)] = 1
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), input_ids.shape).copy()
        return {
            "input_ids": input_ids,
            "positions": positions,
            "segment_ids": segment_ids,
            "pad_id": np.int32(self.pad_id),
        }
