"""Prompt tuning, P-tuning and prefix tuning (P-tuning v2): virtual tokens and key/value
prefixes trained on a frozen model, saved in PEFT's adapter format.

As PEFT computes them (peft 0.21):
  prompt tuning  N embeddings [N, D] stand before every document (input ids -1..-N in a row,
                 see sft_jax.models.decoder); init N(0, 1), rows of the (scaled) embedding
                 table at random ids, or of a text's tokens repeated / cut to N.
  P-tuning       the same virtual tokens, computed by PEFT's PromptEncoder from an embedding
                 [N, D]: an MLP D -> H -> H -> D (ReLU), or a bidirectional LSTM (H per
                 direction, `encoder_num_layers` layers) and an MLP 2H -> 2H -> D.
  prefix tuning  per layer N keys and values [N, K, E] (K: key/value heads, so GQA-aware),
                 from a table [N, L * 2 * K * E], or with `prefix_projection` from an embedding
                 [N, K * E] through Linear(K * E, H), tanh, Linear(H, L * 2 * K * E).
PEFT saves one tensor, `prompt_embeddings`: the virtual tokens [N, D] (P-tuning: the encoder's
output) or the flat prefix [N, L * 2 * K * E] (with the projection applied).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sft_jax.adapters.lora import parameter_counts
from sft_jax.core.errors import CheckpointError
from sft_jax.core.spec import RunSpec
from sft_jax.models.decoder import CausalLM
from sft_jax.models.io import safetensors as safetensors_io
from sft_jax.models.io.hf import to_host
from sft_jax.models.kv_cache import KVPrefix

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
PEFT_TYPES = {
    "prompt_tuning": "PROMPT_TUNING",
    "p_tuning": "P_TUNING",
    "prefix_tuning": "PREFIX_TUNING",
}
INITS = ("random", "sample_vocab", "text")  # PEFT's RANDOM, SAMPLE_VOCAB, TEXT
ENCODERS = ("mlp", "lstm")  # PEFT's encoder_reparameterization_type
REPLICATED = (None, None)


class PromptParam(nnx.Param):
    """What these adapters train (the model only computes with it)."""


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """What config.prompt asks for; method "" means none."""

    method: str = ""
    num_virtual_tokens: int = 0
    init: str = "random"
    init_text: str = ""
    encoder_type: str = "mlp"
    encoder_hidden_size: int = 0  # 0: PEFT's default, token_dim
    encoder_num_layers: int = 2
    prefix_projection: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.method)

    @property
    def tokens_in_rows(self) -> int:
        """Slots each document takes in a row before its own tokens (prefix tuning: none)."""
        return self.num_virtual_tokens if self.method in ("prompt_tuning", "p_tuning") else 0

    @classmethod
    def from_config(cls, config: RunSpec) -> PromptSpec:
        """The spec of config.prompt (checked by config_check); none in configs without it."""
        prompt = config.prompt
        return cls(**prompt.to_dict()) if prompt.method else cls()


def virtual_token_ids(count: int) -> np.ndarray:
    """The input ids that stand for the virtual tokens (see sft_jax.models.decoder)."""
    return -1 - np.arange(count, dtype=np.int32)


def _param(value: jax.Array) -> PromptParam:
    return PromptParam(value, logical_axes=REPLICATED[: value.ndim])


class _Dense(nnx.Module):
    """torch.nn.Linear's layout and init: weight [out, in], weight and bias U(+-1/sqrt(in))."""

    def __init__(self, key: jax.Array, fan_in: int, fan_out: int):
        bound = 1.0 / math.sqrt(fan_in)
        weight_key, bias_key = jax.random.split(key)
        self.weight = _param(
            jax.random.uniform(weight_key, (fan_out, fan_in), minval=-bound, maxval=bound)
        )
        self.bias = _param(jax.random.uniform(bias_key, (fan_out,), minval=-bound, maxval=bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.weight[...].T + self.bias[...][None]


class PromptEmbedding(nnx.Module):
    """Prompt tuning: the virtual tokens are the trained table itself."""

    def __init__(self, table_NxD: jax.Array):
        self.embedding = _param(table_NxD)

    def __call__(self) -> jax.Array:
        return self.embedding[...]


class _LSTMDirection(nnx.Module):
    """One direction of one layer of torch.nn.LSTM (gates i, f, g, o; U(+-1/sqrt(H)))."""

    def __init__(self, key: jax.Array, fan_in: int, hidden: int):
        bound = 1.0 / math.sqrt(hidden)
        shapes = {
            "weight_ih": (4 * hidden, fan_in),
            "weight_hh": (4 * hidden, hidden),
            "bias_ih": (4 * hidden,),
            "bias_hh": (4 * hidden,),
        }
        for (name, shape), sub in zip(shapes.items(), jax.random.split(key, 4), strict=True):
            setattr(self, name, _param(jax.random.uniform(sub, shape, minval=-bound, maxval=bound)))
        self.hidden = hidden

    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        gates_Nx4H = x_NxI @ self.weight_ih[...].T + (self.bias_ih[...] + self.bias_hh[...])[None]

        def step(carry, gates):
            h, c = carry
            i, f, g, o = jnp.split(gates + h @ self.weight_hh[...].T, 4)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        zeros = jnp.zeros((self.hidden,), x_NxI.dtype)
        return jax.lax.scan(step, (zeros, zeros), gates_Nx4H)[1]


class PromptEncoder(nnx.Module):
    """P-tuning: PEFT's PromptEncoder (MLP or bidirectional LSTM + MLP) over an embedding."""

    def __init__(self, key: jax.Array, spec: PromptSpec, token_dim: int):
        hidden = spec.encoder_hidden_size or token_dim
        keys = iter(jax.random.split(key, 4 + 2 * spec.encoder_num_layers))
        self.embedding = _param(jax.random.normal(next(keys), (spec.num_virtual_tokens, token_dim)))
        self.lstm = nnx.data(None)
        if spec.encoder_type == "lstm":
            self.lstm = nnx.List(
                [
                    nnx.List(
                        [
                            _LSTMDirection(
                                next(keys), token_dim if layer == 0 else 2 * hidden, hidden
                            )
                            for _ in range(2)
                        ]
                    )
                    for layer in range(spec.encoder_num_layers)
                ]
            )
            widths = (2 * hidden, 2 * hidden, token_dim)
        else:
            widths = (token_dim, hidden, hidden, token_dim)
        self.mlp = nnx.List([_Dense(next(keys), a, b) for a, b in itertools.pairwise(widths)])

    def __call__(self) -> jax.Array:
        x = self.embedding[...]
        for forward, backward in self.lstm if self.lstm is not None else ():
            x = jnp.concatenate([forward(x), backward(x[::-1])[::-1]], axis=-1)
        for index, dense in enumerate(self.mlp):
            x = dense(x) if index == len(self.mlp) - 1 else jax.nn.relu(dense(x))
        return x


class PrefixEncoder(nnx.Module):
    """Prefix tuning: every layer's key/value prefix, from a table or through the projection."""

    def __init__(self, key: jax.Array, spec: PromptSpec, layers: int, kv_heads: int, head_dim: int):
        self.shape = (layers, kv_heads, head_dim)
        width = layers * 2 * kv_heads * head_dim
        count, kv_width = spec.num_virtual_tokens, kv_heads * head_dim
        keys = jax.random.split(key, 3)
        self.transform = nnx.data(None)
        if spec.prefix_projection:
            hidden = spec.encoder_hidden_size or kv_width
            self.embedding = _param(jax.random.normal(keys[0], (count, kv_width)))
            self.transform = nnx.List(
                [_Dense(keys[1], kv_width, hidden), _Dense(keys[2], hidden, width)]
            )
        else:
            self.embedding = _param(jax.random.normal(keys[0], (count, width)))

    def flat(self) -> jax.Array:
        """[N, L * 2 * K * E]: what PEFT saves as prompt_embeddings."""
        x = self.embedding[...]
        if self.transform is not None:
            x = self.transform[1](jnp.tanh(self.transform[0](x)))
        return x

    def __call__(self) -> tuple[KVPrefix, ...]:
        layers, kv_heads, head_dim = self.shape
        x_NxLx2xKxE = self.flat().reshape(-1, layers, 2, kv_heads, head_dim)
        return tuple(
            KVPrefix(x_NxLx2xKxE[:, layer, 0], x_NxLx2xKxE[:, layer, 1]) for layer in range(layers)
        )


def init_ids(spec: PromptSpec, key: jax.Array, vocab_size: int, tokenizer: Any) -> np.ndarray:
    """Token ids whose embeddings start the virtual tokens (sample_vocab, text), as PEFT picks
    them: random ids, or the text's ids (special tokens added) repeated and cut to N."""
    count = spec.num_virtual_tokens
    if spec.init == "sample_vocab":
        return np.asarray(jax.random.randint(key, (count,), 0, vocab_size))
    ids = list(tokenizer(spec.init_text)["input_ids"])
    return np.asarray((ids * math.ceil(count / len(ids)))[:count], np.int32)


def apply_prompt(model: CausalLM, spec: PromptSpec, seed: int = 0, tokenizer: Any = None) -> None:
    """Attaches the method's module to the model's hook (the base stays as it is)."""
    key = jax.random.key(seed)
    c = model.config
    if spec.method == "prefix_tuning":
        model.kv_prefix = PrefixEncoder(key, spec, c.num_layers, c.num_kv_heads, c.head_dim)
    elif spec.method == "p_tuning":
        model.virtual_tokens = PromptEncoder(key, spec, c.hidden_size)
    elif spec.init == "random":
        table = jax.random.normal(key, (spec.num_virtual_tokens, c.hidden_size))
        model.virtual_tokens = PromptEmbedding(table)
    else:  # rows of the embedding as the model scales them (Gemma: by sqrt(D)), as PEFT does
        ids = init_ids(spec, key, c.vocab_size, tokenizer)
        table = model.lookup_embeddings(jnp.asarray(ids)[None])[0].astype(jnp.float32)
        model.virtual_tokens = PromptEmbedding(table)


def trainable_line(model: CausalLM, trainable: Any) -> str:
    trained, total = parameter_counts(model, trainable)
    return (
        f"trainable params: {trained:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trained / total:.4f}"
    )


def prompt_embeddings(model: CausalLM) -> jax.Array:
    """The one tensor PEFT saves for these methods (see the module docstring)."""
    if model.kv_prefix is not None:
        return model.kv_prefix.flat()
    return model.virtual_tokens()


def save_prompt_adapter(
    model: CausalLM, out_dir: str | Path, spec: PromptSpec, base_model: str = ""
) -> Path:
    """adapter_config.json + adapter_model.safetensors as peft.PeftModel.from_pretrained loads
    them (process 0 writes)."""
    out_dir = Path(out_dir)
    array = prompt_embeddings(model).astype(jnp.float32)
    tensor = safetensors_io.PendingTensor(
        "prompt_embeddings", tuple(array.shape), np.dtype(np.float32), lambda: to_host(array)
    )
    if jax.process_index() != 0:
        tensor.produce()
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    safetensors_io.write_file(out_dir / "adapter_model.safetensors", [tensor], {"format": "pt"})
    config = adapter_config(spec, model, base_model)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def adapter_config(spec: PromptSpec, model: CausalLM, base_model: str = "") -> dict[str, Any]:
    """PEFT's adapter_config.json of this spec on this model (prefix tuning: token_dim and
    num_attention_heads of the key/value heads, as PEFT sets them for grouped-query attention)."""
    c = model.config
    heads, token_dim = c.num_heads, c.hidden_size
    if spec.method == "prefix_tuning":
        heads, token_dim = c.num_kv_heads, c.num_kv_heads * c.head_dim
    config = {
        "peft_type": PEFT_TYPES[spec.method],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "inference_mode": True,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": c.num_layers,
        "modules_to_save": None,
    }
    hidden = spec.encoder_hidden_size or token_dim
    if spec.method == "prompt_tuning":
        config |= {
            "prompt_tuning_init": spec.init.upper(),
            "tokenizer_name_or_path": None,
            "prompt_tuning_init_text": spec.init_text or None,
        }
        if spec.init == "text":  # PEFT's config requires the tokenizer with a TEXT init
            config["tokenizer_name_or_path"] = base_model or None
    elif spec.method == "p_tuning":
        config |= {
            "encoder_reparameterization_type": spec.encoder_type.upper(),
            "encoder_hidden_size": hidden,
            "encoder_num_layers": spec.encoder_num_layers,
            "encoder_dropout": 0.0,
        }
    else:
        config |= {
            "encoder_hidden_size": hidden,
            "prefix_projection": spec.prefix_projection,
            "init_weights": None,
        }
    return config


def load_prompt_adapter(model: CausalLM, adapter_dir: str | Path) -> PromptSpec:
    """Puts an exported adapter (ours or PEFT's: adapter_config.json + prompt_embeddings) on
    `model` for inference: virtual tokens as a table (P-tuning's encoder output, as PEFT saves
    it), or every layer's prefix from the flat [N, L * 2 * K * E]. Returns its spec."""
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    method = {peft: ours for ours, peft in PEFT_TYPES.items()}.get(config.get("peft_type"))
    entries = safetensors_io.read_header(adapter_dir / "adapter_model.safetensors")
    if method is None or "prompt_embeddings" not in entries:
        raise CheckpointError(
            f"{adapter_dir}: not a prompt tuning, P-tuning or prefix tuning "
            f"adapter (peft_type {config.get('peft_type')!r})."
        )
    table = entries["prompt_embeddings"].read().astype(np.float32)
    spec = PromptSpec(method, int(config["num_virtual_tokens"]))
    as_table = "prefix_tuning" if method == "prefix_tuning" else "prompt_tuning"
    apply_prompt(model, PromptSpec(as_table, spec.num_virtual_tokens))
    module = model.kv_prefix if method == "prefix_tuning" else model.virtual_tokens
    expected = module.embedding[...].shape
    if table.shape != expected or config.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(
            f"{adapter_dir}: prompt_embeddings {table.shape} do not fit this model (expected "
            f"{expected}); was the adapter trained on another base model?"
        )
    module.embedding[...] = _beside(jnp.asarray(table), model.embed[...])
    return spec


def _beside(value: jax.Array, weight: jax.Array) -> jax.Array:
    """`value` replicated over the devices of the mesh `weight` is sharded on (a model loaded
    over several devices), else as it is."""
    mesh = getattr(weight.sharding, "mesh", None)
    if not isinstance(mesh, jax.sharding.Mesh):
        return value
    return jax.device_put(value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def prompt_prefix_ids(model: CausalLM) -> list[int]:
    """Input ids a prompt starts with on `model`: its virtual tokens (prompt tuning, P-tuning),
    else none (prefix tuning's keys and values come from the model itself)."""
    if model.virtual_tokens is None:
        return []
    return virtual_token_ids(model.virtual_tokens().shape[0]).tolist()


def trainable_filter() -> Any:
    """What the optimizer updates under these methods: their modules only."""
    return PromptParam
