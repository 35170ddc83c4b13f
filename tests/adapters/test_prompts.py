"""Prompt tuning, P-tuning, prefix tuning and NEFTune: PEFT parity (logits, encoders, greedy
generation, parameter counts), packing, what trains, and the noise."""

from __future__ import annotations

import dataclasses
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx
from hf_models import build_hf_model, hf_logits, save_hf_model
from test_data import base_config, conversation, data_config, write_jsonl  # noqa: F401
from test_generate import chat_model_dir, checkpoints, run_chat  # noqa: F401
from test_models import assert_close_on_tokens, jax_logits, padded_batch
from test_step import ROWS, SEQ_LEN, synthetic_batch, train_config

from sft_jax.adapters.prompts import (
    PromptEncoder,
    PromptParam,
    PromptSpec,
    apply_prompt,
    load_prompt_adapter,
    parameter_counts,
    save_prompt_adapter,
    virtual_token_ids,
)
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data import load_datasets, open_data
from sft_jax.data.batches import make_rows
from sft_jax.data.tokenize import from_documents
from sft_jax.generation.sampler import chat_prompt_ids, generate
from sft_jax.models import CheckpointError, from_pretrained
from sft_jax.models.kv_cache import KVCache
from sft_jax.train import sharding, step
from sft_jax.train.compiled import build_steps, init_state
from sft_jax.train.config_check import check_values
from sft_jax.train.optim import make_optimizer
from sft_jax.train.sharding import device_batch
from sft_jax.train.step import StepOptions, StepSpec

N = 5
SPECS = {
    "prompt_tuning": PromptSpec("prompt_tuning", N),
    "p_tuning_mlp": PromptSpec("p_tuning", N, encoder_hidden_size=16),
    "p_tuning_lstm": PromptSpec("p_tuning", N, encoder_type="lstm", encoder_hidden_size=16),
    "prefix_tuning": PromptSpec("prefix_tuning", N),
    "prefix_projection": PromptSpec("prefix_tuning", N, encoder_hidden_size=16,
                                    prefix_projection=True),
}  # fmt: skip


def peft_config(spec: PromptSpec) -> peft.PeftConfig:
    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": spec.num_virtual_tokens}
    hidden = spec.encoder_hidden_size or None
    if spec.method == "prompt_tuning":
        return peft.PromptTuningConfig(**common)
    if spec.method == "p_tuning":
        return peft.PromptEncoderConfig(
            **common, encoder_hidden_size=hidden,
            encoder_reparameterization_type=spec.encoder_type.upper(),
        )  # fmt: skip
    return peft.PrefixTuningConfig(
        **common, encoder_hidden_size=hidden, prefix_projection=spec.prefix_projection
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gqa")
    save_hf_model("llama3.1", path)  # 4 query heads over 2 key/value heads
    return path


def prompt_model(path, spec: PromptSpec, seed: int = 1):
    model = from_pretrained(path, mesh=sharding.single_device_mesh())
    apply_prompt(model, spec, seed=seed)
    return model


def with_virtual_tokens(batch: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The batch as our rows hold it under prompt tuning: N virtual slots before each row."""
    rows, length = batch["input_ids"].shape
    mask = np.concatenate([np.ones((rows, count), np.int32), batch["attention_mask"]], axis=1)
    ids = np.concatenate([np.tile(virtual_token_ids(count), (rows, 1)), batch["input_ids"]], 1)
    positions = np.tile(np.arange(count + length, dtype=np.int32), (rows, 1)) * mask
    return {"input_ids": ids, "attention_mask": mask, "positions": positions, "segment_ids": mask}


def load_in_peft(path, adapter_dir):
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    save_hf_model("gemma2", path)  # sliding windows, soft-capping, scaled embeddings
    return path


@pytest.mark.parametrize("name", [*sorted(SPECS), "gemma2_prompt_tuning", "gemma2_prefix_tuning"])
def test_exported_adapter_in_peft_gives_our_logits(base, gemma2, tmp_path, name):
    if name.startswith("gemma2_"):
        base, name = gemma2, name.removeprefix("gemma2_")
    spec = SPECS[name]
    model = prompt_model(base, spec)
    save_prompt_adapter(model, tmp_path / "adapter", spec, base_model=str(base))
    peft_model = load_in_peft(base, tmp_path / "adapter")
    assert peft_model.peft_config["default"].peft_type.value == {
        "prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"
    }[spec.method]  # fmt: skip
    batch = padded_batch(seed=3)
    expected = hf_logits(peft_model, batch["input_ids"], batch["attention_mask"])
    if spec.tokens_in_rows:  # PEFT returns the virtual positions' logits too
        batch = with_virtual_tokens(batch, N)
    assert expected.shape[1] == batch["input_ids"].shape[1]
    actual = jax_logits(model, batch)
    assert_close_on_tokens(actual, expected, batch["attention_mask"], rel_tol=1e-4)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_trainable_parameter_count_equals_peft(base, name):
    spec = SPECS[name]
    expected = peft.get_peft_model(build_hf_model("llama3.1"), peft_config(spec))
    assert parameter_counts(prompt_model(base, spec), PromptParam) == (
        expected.get_nb_trainable_parameters()
    )


def _copy_linear(ours, theirs) -> None:
    ours.weight[...] = jnp.asarray(theirs.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_prompt_encoder_equals_peft(encoder):
    """P-tuning's reparameterisation while training: PEFT's PromptEncoder with our weights."""
    spec = PromptSpec("p_tuning", N, encoder_type=encoder, encoder_hidden_size=8)
    config = peft_config(spec)
    config.token_dim, config.num_transformer_submodules = 12, 1
    torch.manual_seed(0)
    theirs = peft.PromptEncoder(config)
    ours = PromptEncoder(jax.random.key(0), spec, 12)
    ours.embedding[...] = jnp.asarray(theirs.embedding.weight.detach().numpy())
    linears = [m for m in theirs.mlp_head if isinstance(m, torch.nn.Linear)]
    for mine, linear in zip(ours.mlp, linears, strict=True):
        _copy_linear(mine, linear)
    if encoder == "lstm":
        for layer, directions in enumerate(ours.lstm):
            for direction, suffix in zip(directions, ("", "_reverse"), strict=True):
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    value = getattr(theirs.lstm_head, f"{name}_l{layer}{suffix}")
                    getattr(direction, name)[...] = jnp.asarray(value.detach().numpy())
    expected = theirs(torch.arange(N)[None]).detach().numpy()[0]
    np.testing.assert_allclose(np.asarray(ours()), expected, rtol=1e-5, atol=1e-6)


def test_prefix_projection_equals_peft(base, tmp_path):
    """The projected prefix we train with is what PEFT computes from the same weights."""
    spec = SPECS["prefix_projection"]
    model = prompt_model(base, spec)
    theirs = peft.get_peft_model(build_hf_model("llama3.1"), peft_config(spec))
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        encoder.embedding.weight.copy_(torch.as_tensor(np.asarray(model.kv_prefix.embedding[...])))
        for mine, linear in zip(model.kv_prefix.transform, encoder.transform[::2], strict=True):
            linear.weight.copy_(torch.as_tensor(np.asarray(mine.weight[...])))
            linear.bias.copy_(torch.as_tensor(np.asarray(mine.bias[...])))
    expected = theirs.get_prompt_embedding_to_save("default").numpy()
    np.testing.assert_allclose(np.asarray(model.kv_prefix.flat()), expected, rtol=1e-5, atol=1e-6)


def _peft_greedy(peft_model, prompt: list[int], steps: int) -> list[int]:
    """A greedy loop over PEFT's forward pass (its cached generate is wrong for these methods)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = peft_model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_greedy_generation_equals_peft(base, tmp_path, name):
    spec = SPECS[name]
    model = prompt_model(base, spec, seed=2)
    save_prompt_adapter(model, tmp_path / "adapter", spec)
    peft_model = load_in_peft(base, tmp_path / "adapter")
    prompts = [[5, 17, 42, 9], [7, 3]]
    virtual = virtual_token_ids(spec.tokens_in_rows).tolist()
    ours = generate(model, [virtual + p for p in prompts], max_new_tokens=8, stop_token_ids=[])
    assert ours == [_peft_greedy(peft_model, p, 8) for p in prompts]


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_packed_documents_each_see_their_own_virtual_tokens(base, name):
    """Two documents packed in one row give the logits each gives alone."""
    spec = SPECS[name]
    model = prompt_model(base, spec)
    rng = np.random.default_rng(0)
    docs = [virtual_token_ids(spec.tokens_in_rows).tolist() + rng.integers(3, 100, n).tolist()
            for n in (6, 4)]  # fmt: skip

    def row(documents):
        ids = np.concatenate([np.asarray(d, np.int32) for d in documents])
        positions = np.concatenate([np.arange(len(d), dtype=np.int32) for d in documents])
        segments = np.concatenate([np.full(len(d), i + 1, np.int32) for i, d in enumerate(docs)
                                   if d in documents])  # fmt: skip
        return {"input_ids": ids[None], "positions": positions[None], "segment_ids": segments[None]}

    packed = jax_logits(model, row(docs))[0]
    alone = np.concatenate([jax_logits(model, row([d]))[0] for d in docs])
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


# --- NEFTune -------------------------------------------------------------------------------


def test_neftune_noise_has_the_formula_scale(base):
    model = from_pretrained(base, mesh=sharding.single_device_mesh())
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 100, (4, 64)), jnp.int32)
    clean = model._embed(ids)
    model.embedding_noise = 5.0
    noise = np.asarray(model._embed(ids, jax.random.key(0)) - clean)
    bound = 5.0 / np.sqrt(64 * model.config.hidden_size)  # alpha / sqrt(L * d)
    assert np.abs(noise).max() <= bound * (1 + 1e-5)
    assert np.abs(noise).max() > 0.99 * bound
    np.testing.assert_allclose(noise.std(), bound / np.sqrt(3), rtol=0.03)  # U(-b, b)


def test_neftune_is_off_at_eval_and_in_generation(base):
    plain = from_pretrained(base, mesh=sharding.single_device_mesh())
    noisy = from_pretrained(base, mesh=sharding.single_device_mesh())
    noisy.embedding_noise = 50.0
    batch = padded_batch()
    args = (batch["input_ids"], batch["positions"], batch["segment_ids"])
    np.testing.assert_array_equal(noisy.hidden_states(*args), plain.hidden_states(*args))
    trained = noisy.hidden_states(*args, dropout_key=jax.random.key(0))
    assert not np.allclose(trained, plain.hidden_states(*args), atol=1e-3)
    # Generation runs every token through extend, which takes no key: equal to the plain model.
    cache = KVCache.empty(plain.config, 2, 32, jnp.float32)
    ids, positions = batch["input_ids"], batch["positions"] * batch["attention_mask"]
    np.testing.assert_array_equal(noisy.extend(ids, positions, cache)[0],
                                  plain.extend(ids, positions, cache)[0])  # fmt: skip


def prompt_batch(spec: PromptSpec) -> dict[str, np.ndarray]:
    """test_step's packed rows, each document's first tokens turned into virtual tokens."""
    batch = synthetic_batch(0)
    virtual = (batch["positions"] < spec.tokens_in_rows) & (batch["segment_ids"] > 0)
    batch["input_ids"] = np.where(virtual, -1 - batch["positions"], batch["input_ids"])
    batch["target_mask"] &= ~virtual
    return batch


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_projection"])
def test_only_adapter_parameters_train_and_the_loss_falls(base, name):
    """The train state holds the method's module only; steps (NEFTune on) move every one of
    its parameters, lower the loss, and leave the frozen model as it was."""
    spec = SPECS[name]
    model = prompt_model(base, spec)
    model.embedding_noise = 5.0
    mesh = sharding.single_device_mesh()
    tx, schedule = make_optimizer(train_config(warmup_steps=0, learning_rate=3e-2))
    state, shardings = init_state(model, tx, mesh, PromptParam)
    steps = build_steps(model, tx, schedule, mesh, shardings, train_rows=ROWS, eval_rows=ROWS,
                        seq_len=SEQ_LEN, options=StepOptions(), trainable=PromptParam)  # fmt: skip
    params = jax.tree.leaves(state["params"])
    assert sum(x.size for x in params) == parameter_counts(model, PromptParam)[0]
    before = [np.asarray(x) for x in params]
    frozen_before = jax.tree.map(np.asarray, steps.frozen)
    batch = device_batch(prompt_batch(spec), steps.batch_shardings)
    losses = []
    for _ in range(6):
        state, metrics = steps.train(state, batch)
        losses.append(float(metrics["train/loss"]))
    after = jax.tree.leaves(state["params"])
    assert all(not np.allclose(a, b) for a, b in zip(after, before, strict=True))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, steps.frozen),
                 frozen_before)  # fmt: skip


def test_spec_tokens_in_rows():
    assert dataclasses.replace(SPECS["prefix_tuning"]).tokens_in_rows == 0
    assert SPECS["p_tuning_mlp"].tokens_in_rows == N


# --- Rows, max_length and bad configs ------------------------------------------------------


def test_virtual_tokens_in_rows_positions_and_targets():
    """Each packed document starts with its own N virtual tokens: positions 0..N-1 then its
    tokens from N, nothing trained on them, the last one predicting the document's first."""
    docs = [(np.array([7, 8, 9], np.int32), np.array([0, 1, 1], bool)),
            (np.array([4, 5], np.int32), np.array([1, 1], bool))]  # fmt: skip
    tokenized = from_documents(docs, {}).with_prefix(virtual_token_ids(2))
    np.testing.assert_array_equal(tokenized.lengths(), [5, 4])
    row = make_rows(tokenized, [[0, 1]], 10)
    np.testing.assert_array_equal(row["input_ids"][0], [-1, -2, 7, 8, 9, -1, -2, 4, 5, 0])
    np.testing.assert_array_equal(row["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0])
    np.testing.assert_array_equal(row["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 0])
    np.testing.assert_array_equal(row["target_mask"][0], [0, 0, 1, 1, 0, 0, 1, 1, 0, 0])


def test_virtual_tokens_count_against_max_length(data_config, tmp_path):  # noqa: F811
    """Documents are cut at max_length - N, counted as truncated, so rows never overflow."""
    reply = " ".join(["Answer"] * 80)
    long_reply = {"messages": [{"role": "user", "content": "Add 1 and 1"},
                               {"role": "assistant", "content": reply}]}  # fmt: skip
    write_jsonl(tmp_path / "train.jsonl", [long_reply, conversation(2)])
    data_config.prompt.method, data_config.prompt.num_virtual_tokens = "prompt_tuning", 10
    data = open_data(RunSpec.of(data_config))
    assert data.seq_len == 64
    batch = next(iter(data.train_batches))
    for ids, segments in zip(batch["input_ids"], batch["segment_ids"], strict=True):
        assert (ids < 0).sum() == 10 * len(set(segments[segments > 0].tolist()))
    train = load_datasets(RunSpec.of(data_config)).train  # from the cache open_data wrote
    assert train.stats["truncated"] == 1
    assert train.lengths().max() == 64 - 10


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"prompt.method": "prefix_tuning", "model.attention": "splash"}, "model.attention"),
        ({"prompt.method": "prefix_tuning", "model.attention": "cudnn"}, "model.attention"),
        ({"prompt.method": "prompt_tuning", "prompt.num_virtual_tokens": 127},
         "prompt.num_virtual_tokens"),
        ({"prompt.method": "p_tuning", "lora.rank": 8}, "lora.rank"),
        ({"prompt.method": "prompt_tuning", "prompt.init": "text"}, "prompt.init_text"),
        ({"prompt.method": "prefix_tuning", "train.objective": "simpo"}, "train.objective"),
        ({"prompt.method": "soft_prompt"}, "prompt.method"),
        ({"train.neftune_noise_alpha": -1.0}, "train.neftune_noise_alpha"),
    ],
)  # fmt: skip
def test_bad_prompt_configs_are_config_errors(overrides, field):
    config = base_config()
    for dotted, value in overrides.items():
        group, name = dotted.split(".")
        config[group][name] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_values(RunSpec.of(config), 1, 1)


def test_prompt_tuning_inits_as_peft(base):
    """text: the text's ids (special tokens included) repeated and cut to N, their embedding
    rows; sample_vocab: rows of the embedding; random: N(0, 1)."""
    model = from_pretrained(base, mesh=sharding.single_device_mesh())
    table = np.asarray(model.embed[...])

    def tokenizer(text):
        assert text == "Answer:"
        return {"input_ids": [5, 6, 7]}

    text = from_pretrained(base, mesh=sharding.single_device_mesh())
    apply_prompt(text, PromptSpec("prompt_tuning", N, init="text", init_text="Answer:"),
                 tokenizer=tokenizer)  # fmt: skip
    np.testing.assert_array_equal(text.virtual_tokens(), table[[5, 6, 7, 5, 6]])
    sampled = prompt_model(base, PromptSpec("prompt_tuning", 64, init="sample_vocab"))
    rows = {tuple(r) for r in table.round(6)}
    assert all(tuple(r) in rows for r in np.asarray(sampled.virtual_tokens()).round(6))
    random = np.asarray(prompt_model(base, PromptSpec("prompt_tuning", 64)).virtual_tokens())
    assert abs(random.std() - 1) < 0.05 and abs(random.mean()) < 0.05


# --- Sharded equals one device; chat on an export ------------------------------------------


def _loss_and_gradients(path, mesh) -> tuple[float, list[np.ndarray]]:
    """The SFT loss on `mesh` and its gradients with respect to P-tuning's encoder and a
    projected prefix, both on one model (the decoder takes virtual tokens and prefixes at
    once: one compile covers every path of the three methods, prompt tuning's table being
    P-tuning's without the encoder)."""
    model = from_pretrained(path, mesh=mesh)
    apply_prompt(model, SPECS["prefix_projection"], seed=1)
    apply_prompt(model, SPECS["p_tuning_mlp"], seed=2)
    graphdef, params, frozen = nnx.split(model, PromptParam, ...)
    params, frozen = (
        jax.device_put(nnx.to_pure_dict(state), sharding.param_shardings(model, mesh, which))
        for state, which in ((params, PromptParam), (frozen, nnx.Not(PromptParam)))
    )
    tx, schedule = make_optimizer(train_config())  # unused by the gradients
    objective = StepOptions(loss_chunk_size=4).objective()
    step_spec = StepSpec(graphdef, tx, schedule, objective)
    batch = device_batch(prompt_batch(SPECS["p_tuning_mlp"]), sharding.batch_shardings(mesh))
    with jax.set_mesh(mesh):
        grads, sums = jax.jit(functools.partial(step.gradients, step_spec))(
            params, frozen, batch, jax.random.key(0)
        )
        loss = objective.loss(sums, objective.normalizer(batch))
    return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]


def test_virtual_tokens_and_prefixes_on_fsdp_tensor_mesh_equal_single_device(base):
    """Loss and every gradient leaf equal on an fsdp x tensor mesh of 8 (the frozen model
    sharded, key/value heads split over tensor) and on one device, each leaf within its own
    scale."""
    loss, grads = _loss_and_gradients(base, sharding.single_device_mesh())
    sharded_loss, sharded_grads = _loss_and_gradients(base, sharding.make_mesh(1, 4, 2))
    np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
    # Two tables (P-tuning's, the prefix's), weight and bias of 3 + 2 linears.
    assert len(grads) == len(sharded_grads) == 2 + 2 * (3 + 2)
    for ours, single in zip(sharded_grads, grads, strict=True):
        scale = float(np.abs(single).max())
        assert scale > 0  # every leaf gets a gradient
        np.testing.assert_allclose(ours, single, rtol=1e-4, atol=1e-5 * scale)


def _peft_reference(peft_model, spec: PromptSpec, prompt: list[int], stops: list[int]):
    """PEFT's greedy tokens: its generate without the KV cache for virtual tokens (equal to
    ours, see test_greedy_generation_equals_peft), a greedy loop over its forward pass for
    prefix tuning (its generate is wrong for prefixes in this version, with or without cache)."""
    if spec.method == "prefix_tuning":
        new = _peft_greedy(peft_model, prompt, 8)
    else:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                do_sample=False, use_cache=False, eos_token_id=stops, pad_token_id=0,
            )  # fmt: skip
        new = out[0, len(prompt) :].tolist()
    ends = [i for i, token in enumerate(new) if token in stops]
    return new[: ends[0]] if ends else new


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_mlp", "prefix_tuning"])
def test_chat_on_a_prompt_export_generates_with_its_adapter(
    chat_model_dir,  # noqa: F811
    run_chat,  # noqa: F811
    tmp_path,
    name,
):
    """`sft_jax.cli.chat --model=EXPORT` (base model + adapter/, as a prompt run exports) and
    `--model=EXPORT/adapter` reply with PEFT's greedy tokens for the same adapter."""
    spec = SPECS[name]
    export = tmp_path / "export"
    shutil.copytree(chat_model_dir, export)
    model = from_pretrained(export, mesh=sharding.single_device_mesh())
    apply_prompt(model, spec, seed=2)
    save_prompt_adapter(model, export / "adapter", spec, base_model=str(export))
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": "t10 t11"}])
    expected = _peft_reference(load_in_peft(export, export / "adapter"), spec, prompt, [2, 4])
    base_reply = (
        transformers.AutoModelForCausalLM.from_pretrained(export)
        .generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=[2, 4])[
            0, len(prompt) :
        ]
        .tolist()
    )
    assert base_reply[: len(expected)] != expected  # the adapter changes the reply
    for directory in (export, export / "adapter"):
        out = run_chat(f"--model={directory}", "--prompt=t10 t11", "--max_new_tokens=8")
        assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_a_prompt_adapter_of_another_model_or_kind_is_a_clear_error(base, gemma2, tmp_path):
    spec = SPECS["prefix_tuning"]
    save_prompt_adapter(prompt_model(base, spec), tmp_path / "adapter", spec)
    other = from_pretrained(gemma2, mesh=sharding.single_device_mesh())
    with pytest.raises(CheckpointError, match="do not fit this model"):
        load_prompt_adapter(other, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace("PREFIX_TUNING", "LORA"))
    with pytest.raises(CheckpointError, match="not a prompt tuning, P-tuning or prefix tuning"):
        load_prompt_adapter(other, tmp_path / "adapter")
