"""Mixture-of-experts MLP block (Qwen3-MoE, Mixtral, Qwen2-MoE): a float32 top-k router,
dropless dispatch (token copies sorted by expert, experts run as grouped matmuls with
jax.lax.ragged_dot: no capacity, no dropped token) and Qwen2-MoE's sigmoid-gated shared expert;
the slots the adapter code fills (LoRA on every expert, QLoRA storage of the expert weights).

Dimension legend: N tokens (B * T flattened), D model width, F expert MLP width, X experts,
K experts per token, M = N * K token copies, L MoE layers (B, T as in decoder.py).

DeepSeek-V3 routes with models/group_routing.py (sigmoid scores, a frozen score-correction
bias, group-limited top-k) and adds its shared experts without a gate. gpt-oss's biased block
subclasses MoEBlock in moe_gpt_oss.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sft_jax.models.config import ModelConfig
from sft_jax.models.group_routing import group_limited_route
from sft_jax.models.kernels.grouped_matmul import grouped_matmul_kind
from sft_jax.models.layers import (
    MLP,
    FrozenParam,
    Linear,
    LoRAParam,
    activate,
    fold_key,
    normal_init,
)
from sft_jax.models.partitioning import DISPATCH_KINDS, experts_per_shard, named_sharding
from sft_jax.models.quantize import QuantizedState, QuantSpec, dequantize, quantize, stored_axes

# The stacked expert parameters of a MoEBlock, by attribute name.
EXPERT_PARAMS = ("experts_gate", "experts_up", "experts_down")


class RouterStats(NamedTuple):
    """What the router did over the real tokens (segment id > 0) of a batch; every field a sum,
    so micro-batches and devices add up. Stacked over MoE layers: a leading [L] axis."""

    expert_load: jax.Array  # top-k slots routed to each expert
    expert_probs: jax.Array  # router probabilities summed per expert (differentiable)
    z: jax.Array  # sum of logsumexp(router logits)^2, the router z-loss term
    tokens: jax.Array  # real tokens


def route(
    x_NxD: jax.Array, router_DxX: jax.Array, top_k: int, renormalize: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(router logits [N, X], chosen experts [N, K], their weights [N, K]), all in float32:
    softmax over experts, top-k, and optionally the top-k renormalized to sum to one."""
    logits_NxX = jnp.einsum("ND,DX->NX", x_NxD.astype(jnp.float32), router_DxX.astype(jnp.float32))
    probs_NxX = jax.nn.softmax(logits_NxX, axis=-1)
    weights_NxK, experts_NxK = jax.lax.top_k(probs_NxX, top_k)
    if renormalize:
        weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    return logits_NxX, experts_NxK, weights_NxK


def dropless_experts(
    x_NxD: jax.Array,
    experts_NxK: jax.Array,
    weights_NxK: jax.Array,
    gate_XxDxF: jax.Array,
    up_XxDxF: jax.Array,
    down_XxFxD: jax.Array,
    activation: str,
    grouped_matmul: str = "ragged_dot",
) -> jax.Array:
    """sum_k weight[n, k] * expert[n, k](x[n]) for every token: the N * K token copies sorted by
    expert, each expert's run a group of one grouped matmul (ragged_dot, or the planner's
    stand-in: models/grouped_matmul.py), then unsorted."""
    matmul = grouped_matmul_kind(grouped_matmul)
    num_tokens, top_k = experts_NxK.shape
    flat_experts = experts_NxK.reshape(-1)
    # Slots routed to an expert id >= X (another device's, under expert parallelism) sort
    # last, past every group: ragged_dot leaves their rows zero.
    order = jnp.argsort(flat_experts, stable=True)
    group_sizes = jnp.sum(
        jax.nn.one_hot(flat_experts, gate_XxDxF.shape[0], dtype=jnp.int32), axis=0
    )
    x_MxD = jnp.take(x_NxD, order // top_k, axis=0)
    gate_MxF = matmul(x_MxD, gate_XxDxF, group_sizes)
    up_MxF = matmul(x_MxD, up_XxDxF, group_sizes)
    out_MxD = matmul(activate(activation, gate_MxF) * up_MxF, down_XxFxD, group_sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0]))
    out_NxKxD = jnp.take(out_MxD, inverse, axis=0).reshape(num_tokens, top_k, -1)
    combined_NxD = jnp.einsum(
        "NKD,NK->ND", out_NxKxD.astype(jnp.float32), weights_NxK.astype(jnp.float32)
    )
    return combined_NxD.astype(x_NxD.dtype)


def router_stats(
    logits_NxX: jax.Array, experts_NxK: jax.Array, real_tokens: jax.Array
) -> RouterStats:
    """The sums transformers' load_balancing_loss_func takes over real tokens, and the z term."""
    real = real_tokens.astype(jnp.float32)
    chosen_NxX = jnp.sum(jax.nn.one_hot(experts_NxK, logits_NxX.shape[-1]), axis=1)
    probs_NxX = jax.nn.softmax(logits_NxX, axis=-1)
    return RouterStats(
        expert_load=jnp.einsum("NX,N->X", jax.lax.stop_gradient(chosen_NxX), real),
        expert_probs=jnp.einsum("NX,N->X", probs_NxX, real),
        z=jnp.sum(jnp.square(jax.nn.logsumexp(logits_NxX, axis=-1)) * real),
        tokens=jnp.sum(real),
    )


class MoEBlock(nnx.Module):
    """Top-k mixture of gated-MLP experts (+ a sigmoid-gated shared expert where configured).

    Expert weights are stacked [X, ...] with the logical axis "expert" (the expert mesh axis
    splits them); the router is a plain parameter [D, X], outside every adapter.
    """

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs):
        c = config
        d, f, x = c.hidden_size, c.moe_intermediate_size, c.num_experts
        self.dtype = dtype
        # How tokens reach experts on other devices under an expert mesh axis (DISPATCH_KINDS;
        # set by use_moe_dispatch).
        self.dispatch = "gather"
        # The grouped matmul the experts run (a key of grouped_matmul.GROUPED_MATMULS; the
        # planner sets its stand-in by use_grouped_matmul).
        self.grouped_matmul = "ragged_dot"
        # Optional low-rank adapters on every expert (add_expert_adapters): per projection in
        # EXPERT_PARAMS an A [X, in, r] and a B [X, r, out], added to the weights as scale * A B.
        self.expert_lora = nnx.data(None)  # nnx.Dict of LoRAParam
        self.expert_lora_scale = 0.0
        # QLoRA (quantize_experts): per projection an nnx.Dict of QuantizedState [X, ...]
        # replacing the stacked weights (then None), dequantized for the grouped matmuls.
        self.expert_quant = nnx.data(None)
        self.expert_quant_spec = None
        self.top_k, self.renormalize, self.activation = (
            c.experts_per_token,
            c.norm_topk_prob,
            c.activation,
        )
        self.router = nnx.Param(
            normal_init(rngs, (d, x), param_dtype), logical_axes=("embed", None)
        )
        # DeepSeek-V3: sigmoid routing with the checkpoint's e_score_correction_bias [X], set by
        # load statistics in pre-training and frozen here (a FrozenParam: never trained).
        self.router_bias = (
            FrozenParam(jnp.zeros((x,), jnp.float32), logical_axes=(None,))
            if c.router_scoring == "sigmoid"
            else None
        )
        self.router_groups = (c.router_groups, c.router_top_groups, c.routed_scaling_factor)
        in_axes, out_axes = ("expert", "embed", "mlp"), ("expert", "mlp", "embed")
        self.experts_gate = nnx.Param(
            normal_init(rngs, (x, d, f), param_dtype), logical_axes=in_axes
        )
        self.experts_up = nnx.Param(normal_init(rngs, (x, d, f), param_dtype), logical_axes=in_axes)
        self.experts_down = nnx.Param(
            normal_init(rngs, (x, f, d), param_dtype), logical_axes=out_axes
        )
        # (name, shape, logical axes) of each stacked weight, known also once it is stored
        # quantized; a tuple, as NNX hashes static attributes.
        self.expert_layout = (
            ("experts_gate", (x, d, f), in_axes),
            ("experts_up", (x, d, f), in_axes),
            ("experts_down", (x, f, d), out_axes),
        )
        shared = c.shared_expert_intermediate_size
        dense = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        gated = shared and c.shared_expert_gated
        self.shared_expert = MLP(c, width=shared, **dense) if gated else None
        self.shared_expert_gate = (
            Linear(d, 1, axes=("embed", None), use_bias=False, **dense) if gated else None
        )
        # DeepSeek-V3's n_shared_experts as one MLP of their summed width, always added.
        self.shared_experts = MLP(c, width=shared, **dense) if shared and not gated else None

    def layout_of(self, name: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """(shape, logical axes) of the stacked weights of one projection in EXPERT_PARAMS."""
        return {entry[0]: entry[1:] for entry in self.expert_layout}[name]

    def expert_weight(self, name: str, dtype: jnp.dtype | None = None) -> jax.Array:
        """The stacked weights [X, in, out] of one projection in `dtype` (the compute dtype by
        default), with the expert adapters added: ragged_dot takes whole weights, so the
        low-rank update is folded in as a merged export does (no adapter dropout here)."""
        dtype = dtype or self.dtype
        if self.expert_quant is None:
            weight_XxIxO = getattr(self, name)[...]
        else:
            stored = {key: value[...] for key, value in self.expert_quant[name].items()}
            dequantize_one = functools.partial(
                dequantize, spec=self.expert_quant_spec, dtype=jnp.float32
            )
            weight_XxIxO = jax.vmap(dequantize_one)(stored)
        if self.expert_lora is None:
            return weight_XxIxO.astype(dtype)
        a_XxIxR, b_XxRxO = (self.expert_lora[f"{name}_{part}"][...] for part in ("a", "b"))
        update = jnp.einsum("XIR,XRO->XIO", a_XxIxR.astype(jnp.float32), b_XxRxO)
        return (weight_XxIxO.astype(jnp.float32) + self.expert_lora_scale * update).astype(dtype)

    def route(self, x_NxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(router logits, chosen experts, their weights) of every token (see route)."""
        if self.router_bias is None:
            return route(x_NxD, self.router[...], self.top_k, self.renormalize)
        groups, top_groups, scaling = self.router_groups
        return group_limited_route(
            x_NxD,
            self.router[...],
            self.router_bias[...],
            top_k=self.top_k,
            groups=groups,
            top_groups=top_groups,
            renormalize=self.renormalize,
            scaling=scaling,
        )

    def __call__(
        self, x_BxTxD: jax.Array, real_BxT: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        """(output [B, T, D], router statistics over the tokens where real_BxT is true)."""
        batch, seq_len, width = x_BxTxD.shape
        x_NxD = x_BxTxD.astype(self.dtype).reshape(batch * seq_len, width)
        logits_NxX, experts_NxK, weights_NxK = self.route(x_NxD)
        stacked = tuple(self.expert_weight(name) for name in EXPERT_PARAMS)
        out_NxD = experts_per_shard(
            functools.partial(
                dropless_experts, activation=self.activation, grouped_matmul=self.grouped_matmul
            ),
            x_NxD,
            experts_NxK,
            weights_NxK,
            stacked,
            dispatch=self.dispatch,
        )
        out_BxTxD = out_NxD.reshape(batch, seq_len, width)
        if self.shared_expert is not None:
            gate_BxTx1 = jax.nn.sigmoid(self.shared_expert_gate(x_BxTxD, fold_key(dropout_key, 3)))
            out_BxTxD = out_BxTxD + gate_BxTx1 * self.shared_expert(x_BxTxD, dropout_key)
        if self.shared_experts is not None:
            out_BxTxD = out_BxTxD + self.shared_experts(x_BxTxD, dropout_key)
        return out_BxTxD, router_stats(logits_NxX, experts_NxK, real_BxT.reshape(-1))


def add_expert_adapters(block: MoEBlock, rank: int, scale: float, key: jax.Array) -> None:
    """LoRA on every expert's projections of `block`: A ~ U(+-1/sqrt(in)) (PEFT's default) and
    B = 0 per expert, so the adapted block starts equal to the base; split over experts like
    the weights they adapt."""
    adapters = {}
    for index, name in enumerate(EXPERT_PARAMS):
        (experts, fan_in, fan_out), (_, in_axis, out_axis) = block.layout_of(name)
        bound = 1.0 / fan_in**0.5
        a = jax.random.uniform(
            jax.random.fold_in(key, index), (experts, fan_in, rank), jnp.float32, -bound, bound
        )
        adapters[f"{name}_a"] = LoRAParam(a, logical_axes=("expert", in_axis, "lora_rank"))
        adapters[f"{name}_b"] = LoRAParam(
            jnp.zeros((experts, rank, fan_out), jnp.float32),
            logical_axes=("expert", "lora_rank", out_axis),
        )
    block.expert_lora, block.expert_lora_scale = nnx.Dict(adapters), scale


def quantize_experts(model: nnx.Module, spec: QuantSpec, mesh: jax.sharding.Mesh) -> None:
    """QLoRA of the expert weights: every expert's [in, out] weight of every MoE block stored as
    quantize.py stores a dense kernel (NF4 / int8 blocks along `in`), split over experts. The
    weights are quantized after loading, one MoE layer at a time, so loading peaks at their
    unquantized size (dense kernels are quantized tensor by tensor as they load)."""
    for block in moe_blocks(model):
        stored_by_name = {}
        for name in EXPERT_PARAMS:
            param = getattr(block, name)
            axes = block.layout_of(name)[1]
            quantize_all = jax.jit(jax.vmap(functools.partial(quantize, spec=spec)))
            stored = quantize_all(param[...])
            stored_by_name[name] = nnx.Dict(
                {
                    key: QuantizedState(
                        jax.device_put(
                            value,
                            named_sharding(
                                ("expert", *stored_axes(key, axes[1:])), value.shape, mesh
                            ),
                        ),
                        logical_axes=("expert", *stored_axes(key, axes[1:])),
                    )
                    for key, value in stored.items()
                }
            )
            setattr(block, name, None)
        block.expert_quant, block.expert_quant_spec = nnx.Dict(stored_by_name), spec


def moe_blocks(model: nnx.Module) -> list[MoEBlock]:
    return [block for _, block in nnx.iter_graph(model) if isinstance(block, MoEBlock)]


def use_moe_dispatch(model: nnx.Module, kind: str) -> None:
    """Switches how every expert block of `model` moves tokens over the expert mesh axis."""
    if kind not in DISPATCH_KINDS:
        raise ValueError(f"moe dispatch={kind!r}: expected one of {DISPATCH_KINDS}.")
    for block in moe_blocks(model):
        block.dispatch = kind


def use_grouped_matmul(model: nnx.Module, kind: str) -> None:
    """Switches the grouped matmul every expert block of `model` runs (GROUPED_MATMULS)."""
    grouped_matmul_kind(kind)
    for block in moe_blocks(model):
        block.grouped_matmul = kind


def stack_stats(per_layer: list[RouterStats]) -> RouterStats | None:
    """One RouterStats with a leading [L] axis, or None for a dense model."""
    if not per_layer:
        return None
    return RouterStats(*(jnp.stack(field) for field in zip(*per_layer, strict=True)))
