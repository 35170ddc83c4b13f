"""Planning from shallow compiles (planning/depth.py): only layers that cost the same repeat."""

from __future__ import annotations

from hf_models import hf_config

from sft_jax.models.config import from_hf_config
from sft_jax.planning import depth


def test_layers_sharing_keys_and_values_are_a_kind_of_their_own():
    """Gemma 4 E-models: the last layers attend with earlier layers' keys and values and have
    double-wide MLPs, so the pattern does not repeat over the whole depth and the planner
    compiles the model whole instead of extending the first layers' line over them."""
    types = ["sliding_attention", "full_attention"] * 4
    shared = from_hf_config(hf_config("gemma4", num_hidden_layers=8, layer_types=types))
    assert shared.kv_sources[-1] != 7 and shared.mlp_width_of(7) > shared.mlp_width_of(0)
    assert depth.layer_period(shared) == 8 and depth.depths(shared) is None
    own = from_hf_config(
        hf_config("gemma4", num_hidden_layers=8, layer_types=types, num_kv_shared_layers=0)
    )
    assert depth.layer_period(own) == 2 and depth.depths(own) == (2, 4)


def test_a_truncated_model_keeps_only_its_layers_of_every_per_layer_field():
    types = ["sliding_attention", "full_attention"] * 4
    shape = from_hf_config(hf_config("gemma4", num_hidden_layers=8, layer_types=types))
    cut = depth.truncated(shape, 4)
    for name in ("layer_head_dims", "layer_kv_heads", "layer_mlp_widths", "kv_sources"):
        assert getattr(cut, name) == getattr(shape, name)[:4], name
    assert cut.value_is_key_layers == tuple(i for i in shape.value_is_key_layers if i < 4)
    assert [depth.layer_kind(cut, i) for i in range(4)] == [
        depth.layer_kind(shape, i) for i in range(4)
    ]
