"""RoPE at long positions (8k-32k): logits equal transformers' for every rope scaling the
supported families define (linear, dynamic, yarn, llama3), and a clear error for the others."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from hf_models import VOCAB, build_hf_model

from sft_jax.models import UnsupportedModelError, from_pretrained

# Three rows of a short sequence placed at high positions: a tiny model stays cheap.
OFFSETS = (8192, 16384, 32768 - 12)
SEQ_LEN = 12
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}

# (case, family, rope settings): each scaling on a family whose checkpoints ship it.
CASES = {
    "llama_default": ("llama2", {"max_position_embeddings": 32768}),
    "llama_linear": (
        "llama2",
        {"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    ),
    "llama_dynamic": (
        "llama2",
        {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    ),
    "llama3": (
        "llama3.1",
        {
            "max_position_embeddings": 32768,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        },
    ),
    "qwen3_yarn": ("qwen3", {"max_position_embeddings": 32768, "rope_scaling": _YARN}),
    "qwen2_yarn_mscale": (
        "qwen2",
        {
            "max_position_embeddings": 32768,
            "rope_scaling": {**_YARN, "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16},
        },
    ),
    "qwen2_yarn_attention_factor": (  # attention_factor given, ramp ends not rounded
        "qwen2",
        {
            "max_position_embeddings": 32768,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 4096,
                "attention_factor": 1.3,
                "truncate": False,
            },
        },
    ),
    "mistral_yarn": ("mistral", {"max_position_embeddings": 32768, "rope_scaling": _YARN}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_at_long_positions(case, tmp_path):
    family, overrides = CASES[case]
    hf_model = build_hf_model(family, **overrides)
    hf_model.save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, VOCAB, size=(len(OFFSETS), SEQ_LEN)).astype(np.int32)
    positions = (np.asarray(OFFSETS)[:, None] + np.arange(SEQ_LEN)[None]).astype(np.int32)
    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.as_tensor(input_ids, dtype=torch.long),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        ).logits.numpy()
    model = from_pretrained(tmp_path)
    actual = np.asarray(model(input_ids, positions, np.ones_like(input_ids)))
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * scale)
    # The scaling matters at these positions: unscaled RoPE gives other logits.
    if overrides.get("rope_scaling"):
        plain = build_hf_model(family, max_position_embeddings=32768)
        with torch.no_grad():
            unscaled = plain(
                input_ids=torch.as_tensor(input_ids, dtype=torch.long),
                position_ids=torch.as_tensor(positions, dtype=torch.long),
            ).logits.numpy()
        assert np.abs(unscaled - expected).max() > 1e-2 * scale


def test_unsupported_rope_type_names_the_config_field(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=4096,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    raw = json.loads(config_path.read_text())
    raw["rope_parameters"] = {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4,
        "long_factor": [2.0] * 4, "original_max_position_embeddings": 1024,
    }  # fmt: skip
    config_path.write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").write_bytes(b"not read: the config is checked first")
    with pytest.raises(UnsupportedModelError, match=r"rope_scaling.*'longrope'.*yarn"):
        from_pretrained(tmp_path)
