"""SmolLM3 (NoPE layers) and OLMo 3 (post-norms, q/k norms over all heads, per-type RoPE):
what sets them apart is read from config.json, greedy generation equals transformers', the
export writes the checkpoint's own tensor names, and what sft_jax cannot follow is refused by
name. Logit parity, packing, bf16 and the export round trip run for them in test_models.py
(they are in hf_models.FAMILIES)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx
from hf_models import hf_config, transformers_greedy
from safetensors import safe_open
from test_models import assert_close_on_tokens, jax_logits, padded_batch

from sft_jax.generation.sampler import generate
from sft_jax.models import UnsupportedModelError, from_hf_config, from_pretrained, save_pretrained
from sft_jax.models.decoder import CausalLM

EOS = 2
# Different lengths; with 16 new tokens every row outgrows the 5-token windows.
PROMPTS = [[1, 17, 33, 5, 80, 9, 64, 101, 12], [1, 40, 7], [1, 90, 91, 3, 55, 28]]
NEW_TOKENS = 16


def test_smollm3_reads_its_nope_layers_and_window():
    config = from_hf_config(hf_config("smollm3"))
    assert config.nope_layers == (1,)  # no_rope_layer_interval=2: every 2nd layer
    assert config.layer_types == ("full_attention", "sliding_attention", "full_attention")
    assert [config.window_for(i) for i in range(3)] == [None, 5, None]
    assert config.rope_of_layer(1) is None and config.rope_of_layer(0).theta == 50000.0
    assert not (config.post_norms or config.qk_norm)
    explicit = from_hf_config(hf_config("smollm3", no_rope_layers=[0, 1, 1]))
    assert explicit.nope_layers == (0,)
    # Without use_sliding_window transformers' own layer_types are all full attention.
    plain = from_hf_config(hf_config("smollm3", use_sliding_window=False))
    assert set(plain.layer_types) == {"full_attention"} and plain.nope_layers == (1,)


def test_olmo3_reads_post_norms_full_width_qk_norms_and_rope_per_layer_type():
    config = from_hf_config(hf_config("olmo3"))
    assert config.post_norms and config.qk_norm and config.qk_norm_full
    assert not config.sandwich_norms and config.nope_layers == ()
    assert config.rope_for("full_attention").rope_type == "yarn"
    assert config.rope_for("sliding_attention").rope_type == "default"
    assert [config.window_for(i) for i in range(3)] == [5, None, 5]
    layer = CausalLM(config, rngs=nnx.Rngs(0)).layers[0]
    assert layer.attn_norm is None and layer.mlp_norm is None
    assert layer.attn.q_norm.scale.shape == (config.num_heads * config.head_dim,)
    assert layer.attn.k_norm.scale.shape == (config.num_kv_heads * config.head_dim,)


@pytest.mark.parametrize("family", ["smollm3", "olmo3"])
def test_greedy_equals_transformers(hf_checkpoint, family):
    path, hf_model = hf_checkpoint(family)
    actual = generate(
        from_pretrained(path), PROMPTS, max_new_tokens=NEW_TOKENS, stop_token_ids=[EOS]
    )
    expected = transformers_greedy(hf_model, PROMPTS, NEW_TOKENS, EOS)
    assert actual == expected


@pytest.mark.parametrize("family", ["smollm3", "olmo3"])
def test_export_writes_the_checkpoint_tensor_names(hf_checkpoint, family, tmp_path):
    path, _ = hf_checkpoint(family)
    out = save_pretrained(from_pretrained(path), tmp_path / "export")

    def names(directory) -> set[str]:
        with safe_open(directory / "model.safetensors", "np") as f:
            return set(f.keys())

    assert names(out) == names(path)


def test_what_sets_each_family_apart_shows_in_the_logits(hf_checkpoint):
    """Turning off NoPE (SmolLM3) or the full-width q/k norms (OLMo 3) changes the logits
    well beyond the parity tolerance: the parity tests see these features."""
    batch = padded_batch()
    for family, change in (("smollm3", {"nope_layers": ()}), ("olmo3", {"qk_norm_full": False})):
        path, _ = hf_checkpoint(family)
        model = from_pretrained(path)
        reference = jax_logits(model, batch)
        model.config = dataclasses.replace(model.config, **change)
        if family == "smollm3":
            for layer in model.layers:
                layer.attn.rope = model.config.rope_for("full_attention")
        else:
            for layer in model.layers:
                layer.attn.qk_norm_full = False
                layer.attn.q_norm.scale.value = np.ones(model.config.head_dim, np.float32)
                layer.attn.k_norm.scale.value = np.ones(model.config.head_dim, np.float32)
        with pytest.raises(AssertionError):
            assert_close_on_tokens(
                jax_logits(model, batch), reference, batch["attention_mask"], rel_tol=1e-2
            )


def test_unsupported_rope_is_refused_naming_the_field():
    longrope = {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8, "original_max_position_embeddings": 64,
    }  # fmt: skip
    smollm3 = hf_config("smollm3", rope_parameters=dict(longrope))
    with pytest.raises(UnsupportedModelError, match=r"smollm3: .*rope_scaling.*'longrope'"):
        from_hf_config(smollm3)
    olmo3 = hf_config("olmo3")
    olmo3.rope_parameters["full_attention"] = dict(longrope)
    with pytest.raises(UnsupportedModelError, match=r"olmo3: .*rope_scaling.*'longrope'"):
        from_hf_config(olmo3)
    olmo3 = hf_config("olmo3", partial_rotary_factor=0.5)
    olmo3.rope_parameters["sliding_attention"]["partial_rotary_factor"] = 0.5
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor"):
        from_hf_config(olmo3)


def test_smollm3_configs_without_one_reading_are_refused():
    short = hf_config("smollm3")
    short.no_rope_layers = [1, 0]
    with pytest.raises(UnsupportedModelError, match=r"no_rope_layers has 2 entries for 3 layers"):
        from_hf_config(short)
    unwindowed = hf_config("smollm3", use_sliding_window=False)
    unwindowed.layer_types = ["full_attention", "sliding_attention", "full_attention"]
    with pytest.raises(UnsupportedModelError, match="use_sliding_window is false"):
        from_hf_config(unwindowed)
