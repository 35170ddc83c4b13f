"""Masked next-token cross-entropy, computed in time chunks so full logits never exist at once.

The batch already holds shifted targets (`target_ids`, built once in the data layer), so the
loss never shifts. It returns *sums* over target tokens; the caller divides once by the number
of target tokens in the whole global batch (all devices, all accumulation micro-batches).

Under a mesh (the compiled steps set one) each device computes the loss of its own rows, with
the LM head gathered once per step, inside `shard_map`: the head's gradient is then summed
over devices once per step, after the chunk loop, not once per chunk (a partitioner left to
itself reduces a [V, D] gradient on every iteration of the loop). Where the vocabulary is split
over the tensor axis, each device holds the logits of its slice of the vocabulary, and the
log-normalizer and the target logit are reduced over that axis (vocabulary-parallel
cross-entropy).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sft_jax.core.errors import ConfigError
from sft_jax.models.decoder import CausalLM
from sft_jax.models.layers import head_logits
from sft_jax.models.partitioning import logical_to_spec


class LossSums(NamedTuple):
    """Sums over the target tokens of a batch."""

    nll: jax.Array  # sum of -log p(target)
    z: jax.Array  # sum of logsumexp(logits)^2, the z-loss term
    target_tokens: jax.Array  # number of target tokens


def time_chunk(seq_len: int, max_chunk: int) -> int:
    """The largest divisor of seq_len that is at most max_chunk."""
    return max(d for d in range(1, min(seq_len, max_chunk) + 1) if seq_len % d == 0)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _scaled_logits(
    hidden_BxCxD: jax.Array, head_VxD: jax.Array, softcap: float | None, temperature: float
) -> jax.Array:
    logits_BxCxV = head_logits(hidden_BxCxD, head_VxD, softcap)
    if temperature != 1.0:  # online RL scores its samples as the sampler drew them
        logits_BxCxV = logits_BxCxV / temperature
    return logits_BxCxV


def _log_normalizer(logits_BxCxV: jax.Array, vocab_axes: tuple[str, ...]) -> jax.Array:
    """log sum exp over the whole vocabulary [B, C]; with vocab_axes, from every slice's partial
    sums (the shift is any constant, here the global max, so it needs no gradient)."""
    if not vocab_axes:
        return jax.nn.logsumexp(logits_BxCxV, axis=-1)
    shift_BxC = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits_BxCxV, -1)), vocab_axes)
    partial_BxC = jnp.sum(jnp.exp(logits_BxCxV - shift_BxC[..., None]), -1)
    return shift_BxC + jnp.log(jax.lax.psum(partial_BxC, vocab_axes))


def _chunk_entropy(
    hidden_BxCxD: jax.Array,
    head_VxD: jax.Array,
    softcap: float | None,
    vocab_axes: tuple[str, ...],
    temperature: float,
) -> jax.Array:
    """The entropy [B, C] of softmax(logits / temperature) at each position of one chunk:
    log Z - sum_v p_v * logit_v."""
    logits_BxCxV = _scaled_logits(hidden_BxCxD, head_VxD, softcap, temperature)
    log_normalizer_BxC = _log_normalizer(logits_BxCxV, vocab_axes)
    probs_BxCxV = jnp.exp(logits_BxCxV - log_normalizer_BxC[..., None])
    expected_BxC = jnp.sum(probs_BxCxV * logits_BxCxV, -1)
    if vocab_axes:
        expected_BxC = jax.lax.psum(expected_BxC, vocab_axes)
    return log_normalizer_BxC - expected_BxC


def _chunk_stats(
    hidden_BxCxD: jax.Array,
    head_VxD: jax.Array,
    targets_BxC: jax.Array,
    softcap: float | None,
    vocab_axes: tuple[str, ...],
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(log-normalizer, target logit) [B, C] of one chunk, of the logits divided by temperature;
    head_VxD is this device's slice of the vocabulary when vocab_axes name the mesh axes it is
    split over, else the whole head."""
    logits_BxCxV = _scaled_logits(hidden_BxCxD, head_VxD, softcap, temperature)
    local_vocab = logits_BxCxV.shape[-1]
    log_normalizer_BxC = _log_normalizer(logits_BxCxV, vocab_axes)
    local_targets_BxC = targets_BxC
    if vocab_axes:
        local_targets_BxC = targets_BxC - jax.lax.axis_index(vocab_axes) * local_vocab
    here_BxC = (local_targets_BxC >= 0) & (local_targets_BxC < local_vocab)
    index_BxCx1 = jnp.clip(local_targets_BxC, 0, local_vocab - 1)[..., None]
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, index_BxCx1, axis=-1)[..., 0]
    target_logit_BxC = jnp.where(here_BxC, target_logit_BxC, 0.0)
    if vocab_axes:
        target_logit_BxC = jax.lax.psum(target_logit_BxC, vocab_axes)
    return log_normalizer_BxC, target_logit_BxC


def _chunk_sums(
    hidden_BxCxD: jax.Array,
    head_VxD: jax.Array,
    targets_BxC: jax.Array,
    mask_BxC: jax.Array,
    softcap: float | None,
    vocab_axes: tuple[str, ...],
) -> LossSums:
    """Sums of one chunk (see _chunk_stats)."""
    log_normalizer_BxC, target_logit_BxC = _chunk_stats(
        hidden_BxCxD, head_VxD, targets_BxC, softcap, vocab_axes
    )
    weights = mask_BxC.astype(jnp.float32)
    return LossSums(
        nll=jnp.sum((log_normalizer_BxC - target_logit_BxC) * weights),
        z=jnp.sum(jnp.square(log_normalizer_BxC) * weights),
        target_tokens=jnp.sum(weights),
    )


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T/C, B, C, ...]."""
    batch_size, seq_len = x.shape[:2]
    return jnp.swapaxes(x.reshape(batch_size, seq_len // chunk, chunk, *x.shape[2:]), 0, 1)


def _scan_chunks(
    hidden_BxTxD: jax.Array,
    head_VxD: jax.Array,
    targets_BxT: jax.Array,
    mask_BxT: jax.Array,
    chunk: int,
    softcap: float | None,
    vocab_axes: tuple[str, ...] = (),
    row_axes: tuple[str, ...] = (),
) -> LossSums:
    """Sums over chunks of `chunk` time steps; inside shard_map, rows split over `row_axes`
    and the vocabulary over `vocab_axes`."""
    # Recomputed in the backward pass: only one chunk's logits are ever held.
    chunk_sums = jax.checkpoint(lambda h, t, m: _chunk_sums(h, head_VxD, t, m, softcap, vocab_axes))

    def accumulate(total: LossSums, xs: tuple[jax.Array, ...]) -> tuple[LossSums, None]:
        sums = chunk_sums(*xs)
        return LossSums(*(a + b for a, b in zip(total, sums, strict=True))), None

    zero = jnp.zeros((), jnp.float32)
    if row_axes:  # the sums of this device's rows
        zero = jax.lax.pcast(zero, row_axes, to="varying")
    chunks = tuple(_to_chunks(x, chunk) for x in (hidden_BxTxD, targets_BxT, mask_BxT))
    total, _ = jax.lax.scan(accumulate, LossSums(zero, zero, zero), chunks)
    return total


def _scan_token_logps(
    hidden_BxTxD: jax.Array,
    head_VxD: jax.Array,
    targets_BxT: jax.Array,
    chunk: int,
    softcap: float | None,
    vocab_axes: tuple[str, ...] = (),
    temperature: float = 1.0,
) -> jax.Array:
    """log p(target) [B, T] in float32, computed (and recomputed backward) chunk by chunk."""

    def chunk_logps(h: jax.Array, t: jax.Array) -> jax.Array:
        log_normalizer_BxC, target_logit_BxC = _chunk_stats(
            h, head_VxD, t, softcap, vocab_axes, temperature
        )
        return target_logit_BxC - log_normalizer_BxC

    chunk_logps = jax.checkpoint(chunk_logps)
    chunks = (_to_chunks(hidden_BxTxD, chunk), _to_chunks(targets_BxT, chunk))
    _, logps_NxBxC = jax.lax.scan(lambda carry, xs: (carry, chunk_logps(*xs)), None, chunks)
    return jnp.swapaxes(logps_NxBxC, 0, 1).reshape(targets_BxT.shape)


def images_of(batch: dict[str, jax.Array], fields: tuple[str, ...]) -> dict | None:
    """The batch's image fields by name (the model's `images=`), None for text."""
    return {name: batch[name] for name in fields} if fields else None


def _final_hidden(
    model: CausalLM,
    batch: dict[str, jax.Array],
    dropout_key: jax.Array | None,
    image_fields: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """(final hidden states [B, T, D], the LM head [V, D] in the parameter dtype)."""
    hidden_BxTxD = model.hidden_states(
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        dropout_key,
        images_of(batch, image_fields),
    )
    # In the parameter dtype, cast per chunk: with bf16 compute and float32 parameters, the
    # head's gradient then adds up over chunks (and devices) in float32, not bf16.
    return hidden_BxTxD, model.head()


def _per_device(
    local: Any,
    hidden_BxTxD: jax.Array,
    head_VxD: jax.Array,
    rows_BxT: tuple[jax.Array, ...],
    out_specs: Any,
) -> Any:
    """local(hidden, head, *rows_BxT, vocab_axes, row_axes) on each device's rows (and slice
    of the vocabulary) in shard_map over the abstract mesh; out_specs(rows spec) is what it
    returns (outputs must be invariant over the vocabulary axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    # Rows, and with a context axis the time axis: each device's tokens.
    rows = logical_to_spec(("batch", "sequence"), rows_BxT[0].shape, mesh)
    vocab = logical_to_spec(("vocab", None), head_VxD.shape, mesh)
    row_axes, vocab_axes = _axes(rows[0]) + _axes(rows[1]), _axes(vocab[0])

    def run(hidden_BxTxD, head_VxD, *rows_BxT):
        # Varying over the row axes from here on: the head's gradient is summed over devices
        # once, where it leaves shard_map, instead of inside the chunk loop.
        head_VxD = jax.lax.pcast(head_VxD, row_axes, to="varying") if row_axes else head_VxD
        return local(hidden_BxTxD, head_VxD, *rows_BxT, vocab_axes, row_axes)

    in_specs = (PartitionSpec(rows[0], rows[1], None), PartitionSpec(vocab[0], None))
    return jax.shard_map(
        run, mesh=mesh, in_specs=(*in_specs, *(rows for _ in rows_BxT)), out_specs=out_specs(rows)
    )(hidden_BxTxD, head_VxD, *rows_BxT)


def loss_sums(
    model: CausalLM,
    batch: dict[str, jax.Array],
    max_chunk: int = 512,
    dropout_key: jax.Array | None = None,
    image_fields: tuple[str, ...] = (),
) -> LossSums:
    """Sums of the masked cross-entropy of `batch` under `model`.

    Logits are computed `chunk` time steps at a time (the batch axis stays whole, so it stays
    sharded) and recomputed in the backward pass: peak logits memory is [B, chunk, V] (per
    device: its rows, its slice of the vocabulary).
    """
    hidden_BxTxD, _ = _final_hidden(model, batch, dropout_key, image_fields)
    return hidden_loss_sums(model, hidden_BxTxD, batch, max_chunk)


def hidden_loss_sums(
    model: CausalLM, hidden_BxTxD: jax.Array, batch: dict[str, jax.Array], max_chunk: int = 512
) -> LossSums:
    """loss_sums from the model's final hidden states (the LM head and the loss only; the MoE
    objective runs the decoder itself, for its router logits)."""
    head_VxD = model.head()  # in the parameter dtype: see _final_hidden
    chunk = time_chunk(hidden_BxTxD.shape[1], max_chunk)
    softcap = model.config.final_logit_softcap
    targets_BxT, mask_BxT = batch["target_ids"], batch["target_mask"]
    if jax.sharding.get_abstract_mesh().empty:
        return _scan_chunks(hidden_BxTxD, head_VxD, targets_BxT, mask_BxT, chunk, softcap)

    def local(hidden_BxTxD, head_VxD, targets_BxT, mask_BxT, vocab_axes, row_axes) -> LossSums:
        chunk = time_chunk(hidden_BxTxD.shape[1], max_chunk)  # of this device's tokens
        sums = _scan_chunks(
            hidden_BxTxD, head_VxD, targets_BxT, mask_BxT, chunk, softcap, vocab_axes, row_axes
        )
        return LossSums(*(jax.lax.psum(s, row_axes) for s in sums)) if row_axes else sums

    scalar = PartitionSpec()
    return _per_device(
        local,
        hidden_BxTxD,
        head_VxD,
        (targets_BxT, mask_BxT),
        lambda rows: LossSums(scalar, scalar, scalar),
    )


def token_logps(
    model: CausalLM,
    batch: dict[str, jax.Array],
    max_chunk: int = 512,
    dropout_key: jax.Array | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    """log p(target_ids[b, t]) [B, T] in float32 under `model` (of softmax(logits /
    temperature)), at every position (the caller masks): chunked like loss_sums, so full
    logits never exist; the rows stay sharded."""
    hidden_BxTxD, _ = _final_hidden(model, batch, dropout_key)
    return hidden_token_logps(model, hidden_BxTxD, batch, max_chunk, temperature)


def hidden_token_entropy(
    model: CausalLM,
    hidden_BxTxD: jax.Array,
    max_chunk: int = 512,
    temperature: float = 1.0,
) -> jax.Array:
    """The entropy [B, T] of the model's next-token distribution (softmax(logits /
    temperature)) at every position, chunked like token_logps; no gradient (a metric: TRL's
    `entropy` of online RL)."""
    head_VxD = jax.lax.stop_gradient(model.head())
    hidden_BxTxD = jax.lax.stop_gradient(hidden_BxTxD)
    softcap = model.config.final_logit_softcap

    def scan(hidden_BxTxD, head_VxD, vocab_axes) -> jax.Array:
        chunk = time_chunk(hidden_BxTxD.shape[1], max_chunk)

        def per_chunk(carry: None, h_BxCxD: jax.Array) -> tuple[None, jax.Array]:
            return carry, _chunk_entropy(h_BxCxD, head_VxD, softcap, vocab_axes, temperature)

        _, out_NxBxC = jax.lax.scan(per_chunk, None, _to_chunks(hidden_BxTxD, chunk))
        return jnp.swapaxes(out_NxBxC, 0, 1).reshape(hidden_BxTxD.shape[:2])

    if jax.sharding.get_abstract_mesh().empty:
        return scan(hidden_BxTxD, head_VxD, ())
    positions_BxT = jnp.zeros(hidden_BxTxD.shape[:2], jnp.int32)  # rows' layout for shard_map

    def local(hidden_BxTxD, head_VxD, _rows_BxT, vocab_axes, row_axes) -> jax.Array:
        return scan(hidden_BxTxD, head_VxD, vocab_axes)

    return _per_device(local, hidden_BxTxD, head_VxD, (positions_BxT,), lambda rows: rows)


def hidden_token_logps(
    model: CausalLM,
    hidden_BxTxD: jax.Array,
    batch: dict[str, jax.Array],
    max_chunk: int = 512,
    temperature: float = 1.0,
) -> jax.Array:
    """token_logps from the model's final hidden states (an objective that runs the decoder
    itself, for a mixture of experts' router statistics)."""
    head_VxD = model.head()  # in the parameter dtype: see _final_hidden
    chunk = time_chunk(hidden_BxTxD.shape[1], max_chunk)
    softcap = model.config.final_logit_softcap
    if jax.sharding.get_abstract_mesh().empty:
        return _scan_token_logps(
            hidden_BxTxD, head_VxD, batch["target_ids"], chunk, softcap, (), temperature
        )

    def local(hidden_BxTxD, head_VxD, targets_BxT, vocab_axes, row_axes) -> jax.Array:
        chunk = time_chunk(hidden_BxTxD.shape[1], max_chunk)  # of this device's tokens
        return _scan_token_logps(
            hidden_BxTxD, head_VxD, targets_BxT, chunk, softcap, vocab_axes, temperature
        )

    return _per_device(local, hidden_BxTxD, head_VxD, (batch["target_ids"],), lambda rows: rows)


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
    """The SFT objective: masked next-token cross-entropy (+ z-loss) per target token.

    The train step (sft_jax.train.step) asks an objective for four things, which is all another
    objective (a preference or reward-model loss) has to provide:
      sums(model, batch, dropout_key) -> a pytree of sums over the batch's rows, additive over
          micro-batches;
      normalizer(batch) -> what the summed loss is divided by, over the *global* batch;
      loss(sums, normalizer) -> the scalar to differentiate;
      metrics(sums, normalizer) -> {"train/...": value};
      eval_metrics(sums of the whole eval set) -> {"eval/loss": ..., ...}.
    """

    z_loss_weight: float = 0.0
    loss_chunk_size: int = 512
    # An image-text model's batch fields (models/image_rows.py) with their per-row shapes (the
    # IMAGE kind's; () for a TOKEN field): the model reads them as images=.
    images: tuple[tuple[str, tuple[int, ...]], ...] = ()
    loss_metric = "ce"  # its loss's own name where the MoE wrapper adds the router's to it

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.images)

    @property
    def per_row(self) -> dict[str, tuple[int, ...]]:
        return dict(self.images)

    def sums(self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None) -> LossSums:
        return loss_sums(
            model,
            batch,
            self.loss_chunk_size,
            dropout_key=dropout_key,
            image_fields=self.batch_keys,
        )

    def sums_with_router(
        self, model: CausalLM, batch: dict[str, jax.Array], dropout_key=None
    ) -> tuple[LossSums, Any]:
        """sums, and the router statistics of the forward pass (objectives/moe.py)."""
        hidden_BxTxD, stats = model.forward(
            batch["input_ids"],
            batch["positions"],
            batch["segment_ids"],
            dropout_key,
            images_of(batch, self.batch_keys),
        )
        return hidden_loss_sums(model, hidden_BxTxD, batch, self.loss_chunk_size), stats

    def normalizer(self, batch: dict[str, jax.Array]) -> jax.Array:
        """Target tokens of the whole global batch (all devices, all micro-batches): uneven
        micro-batches then weigh exactly right."""
        return jnp.maximum(jnp.sum(batch["target_mask"].astype(jnp.float32)), 1.0)

    def loss(self, sums: LossSums, normalizer: jax.Array) -> jax.Array:
        return (sums.nll + self.z_loss_weight * sums.z) / normalizer

    def eval_metrics(self, sums: LossSums) -> dict[str, float]:
        """Over the whole eval set (its sums added up): token-weighted mean cross-entropy."""
        count = float(sums.target_tokens)
        if count == 0:
            raise ConfigError(
                "the eval set has no target tokens: check config.data.eval_files (or "
                "config.data.eval_fraction) and config.data.train_on."
            )
        loss = float(sums.nll) / count
        return {
            "eval/loss": loss,
            "eval/perplexity": math.exp(min(loss, 80.0)),
            "eval/target_tokens": count,
        }

    def metrics(self, sums: LossSums, normalizer: jax.Array) -> dict[str, Any]:
        return {
            "train/loss": sums.nll / normalizer,
            "train/z_loss": sums.z / normalizer,
            "train/target_tokens": sums.target_tokens,
        }
