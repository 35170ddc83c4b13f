"""Qwen3.5 (Gated DeltaNet + gated attention) beyond the shared family tests of test_models.py
(it is in hf_models.FAMILIES): the delta rule against transformers' kernels, packed documents
longer than a chunk, greedy generation through the recurrent state, sharded training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from hf_models import VOCAB
from test_generate import hf_greedy
from test_models import assert_close_on_tokens, jax_logits
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen3_5

from sft_jax.adapters.lora import LoRASpec, apply_lora, save_adapter
from sft_jax.generation.sampler import generate
from sft_jax.models import deltanet, from_pretrained
from sft_jax.models.decoder import decoder_linears
from sft_jax.train import sharding

# Not multiples of the 64-token chunk: documents start and end inside chunks.
LENGTHS = (37, 70, 130)


def _delta_rule_inputs(seq_len: int, seed: int = 0) -> list[np.ndarray]:
    """q, k [B, T, 2, 8], v [B, T, 4, 6], g, beta [B, T, 4] (2 key heads for 4 value heads)."""
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=(2, seq_len, 2, 8)).astype(np.float32) for _ in range(2))
    v = rng.normal(size=(2, seq_len, 4, 6)).astype(np.float32)
    g = (-0.05 * np.abs(rng.normal(size=(2, seq_len, 4)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.normal(size=(2, seq_len, 4))))).astype(np.float32)
    return [q, k, v, g, beta]


def test_delta_rule_restarts_at_documents_as_transformers_alone():
    """Chunked and recurrent forms over packed documents of 37, 70 and 23 tokens equal
    transformers' torch_chunk_gated_delta_rule on each document alone (outputs and the last
    document's final state)."""
    lengths = (37, 70, 23)
    q, k, v, g, beta = _delta_rule_inputs(sum(lengths))
    starts = np.zeros((2, sum(lengths)), bool)
    starts[:, np.cumsum((0, *lengths[:-1]))] = True
    q_n = jnp.repeat(deltanet.l2_normalize(jnp.asarray(q)), 2, axis=2) * 8**-0.5
    k_n = jnp.repeat(deltanet.l2_normalize(jnp.asarray(k)), 2, axis=2)
    zero = jnp.zeros((2, 4, 8, 6))
    forms = [
        rule(q_n, k_n, v, g, beta, starts, zero)
        for rule in (deltanet.chunked_delta_rule, deltanet.recurrent_delta_rule)
    ]
    offset = 0
    for length in lengths:
        piece = [torch.tensor(x[:, offset : offset + length]) for x in (q, k, v, g, beta)]
        expected, state = hf_qwen3_5.torch_chunk_gated_delta_rule(
            *piece[:3],
            g=piece[3],
            beta=piece[4],
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )
        for out, _ in forms:
            np.testing.assert_allclose(
                out[:, offset : offset + length], expected.numpy(), atol=2e-6, rtol=0
            )
        offset += length
    for _, final in forms:
        np.testing.assert_allclose(final, state.numpy(), atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def qwen3_5(hf_checkpoint):
    return hf_checkpoint("qwen3_5")


def _packed(documents: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.concatenate(documents)[None].astype(np.int32),
        "positions": np.concatenate([np.arange(len(d)) for d in documents])[None].astype(np.int32),
        "segment_ids": np.concatenate([[i + 1] * len(d) for i, d in enumerate(documents)])[
            None
        ].astype(np.int32),
    }


def test_packed_documents_longer_than_a_chunk_equal_each_alone(qwen3_5):
    """37 + 70 + 130 tokens in one row: each document's logits are transformers' on that
    document alone; the same row as one document differs (the state would carry over)."""
    path, hf_model = qwen3_5
    rng = np.random.default_rng(4)
    documents = [rng.integers(3, VOCAB, size=n) for n in LENGTHS]
    packed = _packed(documents)
    model = from_pretrained(path)
    actual = jax_logits(model, packed)[0]
    with torch.no_grad():
        expected = np.concatenate(
            [hf_model(input_ids=torch.tensor(d[None])).logits[0].numpy() for d in documents]
        )
    assert_close_on_tokens(actual, expected, np.ones(len(actual)), rel_tol=1e-4)
    one_document = dict(packed, segment_ids=np.ones_like(packed["segment_ids"]))
    leaked = jax_logits(model, one_document)[0]
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert np.abs(leaked[second] - expected[second]).max() > 1e-2 * np.abs(expected).max()


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_greedy_generation_equals_transformers(hf_checkpoint, family):
    """Left-padded batched greedy decoding (chunked prefill, then the recurrent state and the
    convolution state token by token) equals transformers' generate on each prompt; one
    prompt spans two chunks."""
    path, hf_model = hf_checkpoint(family)
    rng = np.random.default_rng(5)
    prompts = [[1, 17, 33, 5, 80, 9], [1, 40, 7], rng.integers(3, VOCAB, size=70).tolist()]
    actual = generate(from_pretrained(path), prompts, max_new_tokens=12, stop_token_ids=[2])
    assert actual == [hf_greedy(hf_model, prompt, 12) for prompt in prompts]


def test_sharded_loss_and_gradients_equal_one_device(qwen3_5):
    """fsdp=4 x tensor=2 on 8 fake devices: the same loss and gradients as one device."""
    path, _ = qwen3_5
    rng = np.random.default_rng(6)
    batch = _packed([rng.integers(3, VOCAB, size=n) for n in (37, 27)])

    def loss_and_grads(model) -> tuple[float, dict]:
        def loss(m):
            logits = m(batch["input_ids"], batch["positions"], batch["segment_ids"])
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            targets = batch["input_ids"][:, 1:, None]
            return -jnp.mean(jnp.take_along_axis(logp, targets, axis=-1))

        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        return float(value), jax.tree.map(np.asarray, nnx.to_pure_dict(grads))

    single_loss, single_grads = loss_and_grads(from_pretrained(path))
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    sharded_loss, sharded_grads = loss_and_grads(from_pretrained(path, mesh=mesh))
    np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        sharded_grads,
        single_grads,
    )


def test_multimodal_checkpoint_loads_its_text_model(qwen3_5, tmp_path):
    """The published Qwen3.5 checkpoints are image-text models (model_type qwen3_5, the text
    model's config in text_config, its tensors under model.language_model.): they load as the
    text model, the vision tower left unused."""
    path, _ = qwen3_5
    text = transformers.AutoConfig.from_pretrained(path)
    wrapper = transformers.Qwen3_5Config(text_config=text.to_dict())
    wrapper.save_pretrained(tmp_path)
    tensors = safetensors.numpy.load_file(path / "model.safetensors")
    renamed = {
        name.replace("model.", "model.language_model.", 1) if name.startswith("model.") else name: t
        for name, t in tensors.items()
    }
    renamed["model.visual.patch_embed.proj.weight"] = np.zeros((2, 2), np.float32)
    safetensors.numpy.save_file(renamed, tmp_path / "model.safetensors")
    batch = _packed([np.arange(3, 40)])
    np.testing.assert_array_equal(
        jax_logits(from_pretrained(tmp_path), batch), jax_logits(from_pretrained(path), batch)
    )


def test_all_linear_lora_exports_to_peft(qwen3_5, tmp_path):
    """LoRA on every linear layer (the Gated DeltaNet's in_proj_* and out_proj included, as
    PEFT's "all-linear"): the PEFT adapter loaded in peft gives our logits."""
    path, _ = qwen3_5
    mesh = sharding.single_device_mesh()
    model = from_pretrained(path, mesh=mesh)
    spec = LoRASpec(rank=4, alpha=8.0)
    apply_lora(model, spec, mesh)
    adapted = {name for _, name, linear in decoder_linears(model) if linear.lora_a is not None}
    assert {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"} <= adapted
    keys = iter(jax.random.split(jax.random.key(1), 64))
    for _, _, linear in decoder_linears(model):
        linear.lora_b[...] = 0.3 * jax.random.normal(next(keys), linear.lora_b[...].shape)
    batch = _packed([np.arange(3, 40)])
    actual = jax_logits(model, batch)
    save_adapter(model, tmp_path / "adapter", spec, base_model=str(path))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model(input_ids=torch.tensor(batch["input_ids"]).long()).logits.numpy()
    assert_close_on_tokens(actual[0], expected[0], np.ones(37), rel_tol=1e-4)
