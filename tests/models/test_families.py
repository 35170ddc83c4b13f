"""Model families register themselves (sft_jax/models/families.py); from_hf_config asks the
registry and nothing else compares model_type names."""

from __future__ import annotations

import dataclasses

import pytest
from hf_models import hf_config

from sft_jax.models import from_hf_config
from sft_jax.models.families import FAMILIES, NOT_YET, Family, UnsupportedModelError


def test_a_registered_family_is_read_with_its_settings(monkeypatch):
    """What a new family needs before its weights load: one registration."""
    hf = hf_config("llama3.1")
    hf.model_type = "toy"
    with pytest.raises(UnsupportedModelError, match=r"'toy' is not supported.*llama, mistral"):
        from_hf_config(hf)
    monkeypatch.setitem(FAMILIES.entries, "toy", Family("toy", qk_norm=True, embed_scale=True))
    config = from_hf_config(hf)
    llama = from_hf_config(hf_config("llama3.1"))
    assert config.model_type == "toy" and config.qk_norm and config.embed_scale
    assert dataclasses.replace(
        config, model_type="llama", qk_norm=False, embed_scale=False, hf_config=llama.hf_config
    ) == dataclasses.replace(llama, hf_config=llama.hf_config)


def test_the_shipped_families_and_those_not_yet_implemented():
    dense = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "smollm3", "olmo3")
    gemma3 = ("gemma3",)  # the image-text model: models/gemma3_vision_config.py
    gemma4 = ("gemma4_text", "gemma4")  # models/gemma4_config.py registers them
    moe = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3")
    qwen3_5 = ("qwen3_5_text", "qwen3_5_moe_text")
    qwen_vl = ("qwen2_5_vl_text", "qwen2_5_vl")  # models/qwen_vl_config.py registers them
    assert FAMILIES.names() == (*dense, *moe, *qwen3_5, *gemma3, *gemma4, *qwen_vl)
    assert FAMILIES.entries["deepseek_v3"].mla
    assert {FAMILIES.entries[n].moe for n in ("mixtral", "qwen2_moe", "qwen3_moe")} == {
        "mixtral",
        "qwen",
    }
    hf = hf_config("llama3.1")
    hf.model_type = "deepseek_v2"
    with pytest.raises(UnsupportedModelError, match=r"'deepseek_v2' .* needs MLA attention"):
        from_hf_config(hf)
    assert "deepseek_v3" not in NOT_YET and {"deepseek_v2", "glm4_moe"} <= set(NOT_YET)
    with pytest.raises(ValueError, match="registered twice"):
        FAMILIES.register("llama", Family("llama"))
