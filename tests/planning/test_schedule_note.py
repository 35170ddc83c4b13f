"""The planner's figure for 1 micro-batch with remat is XLA:CPU's schedule, not the step's need
(sft_jax.planning.search.ONE_MICRO_BATCH): measured here, and said in the plan."""

from __future__ import annotations

import types

import jax
import transformers

from configs import base
from sft_jax.core.spec import RunSpec
from sft_jax.planning import estimate as plan_estimate
from sft_jax.planning import search as plan_search

SEQ, LAYERS = 1024, 4


def _temporaries(model_dir, rows: int, accumulation: int) -> int:
    config = base.get_config()
    config.model.name_or_path = str(model_dir)
    config.model.param_dtype = config.model.compute_dtype = "float32"
    config.data.max_length = SEQ
    config.train.global_batch_size = rows
    spec = RunSpec.of(config)
    shape = plan_estimate.model_config(spec)
    subject = plan_estimate.Subject(spec, shape, attention="blockwise", extrapolate=False)
    candidate = plan_estimate.Candidate(1, 1, 1, 1, accumulation, "full")
    reading = plan_estimate.Reading.compile(subject, LAYERS, candidate, jax.devices()[:1])
    return reading.memory.temporaries


def test_one_micro_batch_plans_far_more_than_the_same_rows_in_a_loop(tmp_path):
    """8 rows at once vs 16 rows in 2 micro-batches of 8, remat 'full': the same micro-batch,
    so about the same activations; XLA:CPU's memory-optimized schedule of the step without a
    loop defers every layer's weight gradients to the end and keeps ~2.4x the temporaries
    (483 vs 202 MiB when written; 94 vs 14.5 MiB per layer from 4 and 8 layers). Should this
    fail after a jax upgrade, XLA's schedule changed: revisit ONE_MICRO_BATCH."""
    transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=SEQ,
    ).save_pretrained(tmp_path)  # fmt: skip
    one = _temporaries(tmp_path, 8, 1)
    looped = _temporaries(tmp_path, 16, 2)
    print(f"temporaries: 8 rows at once {one / 2**20:.1f} MiB, 2 x 8 rows {looped / 2**20:.1f}")
    assert one > 1.8 * looped


def test_the_plan_says_one_micro_batch_is_the_cpu_schedule():
    def estimate(accumulation: int, remat: str):
        candidate = plan_estimate.Candidate(1, 8, 1, 1, accumulation, remat)
        return types.SimpleNamespace(candidate=candidate)

    cpu = jax.devices()
    note = plan_search.schedule_note
    assert note([estimate(1, "full"), estimate(2, "full")], cpu) == plan_search.ONE_MICRO_BATCH
    assert note([estimate(2, "full"), estimate(1, "none")], cpu) == ""
    accelerator = [types.SimpleNamespace(platform="gpu")]
    assert note([estimate(1, "full")], accelerator) == ""
