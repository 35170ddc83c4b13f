"""The planner on an image-text model (a tiny Gemma 3's config.json): the compiled step holds the
vision tower's weights, the rows' image fields and the tower's activations (memory and XLA's
FLOPs grow with the image slots per row), its model FLOPs count the tower (train/vision_flops),
the vision weights are split by the decoder's rules, and `python -m sft_jax.plan` reports the
tower's parameters (transformers' count) and bytes."""

from __future__ import annotations

import jax
import pytest
import transformers
from jax.sharding import PartitionSpec
from test_gemma3_vision import tiny_config, tiny_processor
from test_plan import ROWS, _plan_command, config_for

from sft_jax.core.spec import RunSpec
from sft_jax.planning import estimate as plan_estimate
from sft_jax.planning import vision_plan
from sft_jax.train import sharding, vision_flops

HARDWARE = plan_estimate.Hardware(None, 100e12, 100e9)


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    """A tiny Gemma 3's config.json, and transformers' count of its vision parameters."""
    out = tmp_path_factory.mktemp("gemma3_plan")
    config = tiny_config(tiny_processor().tokenizer)
    config.save_pretrained(out)
    model = transformers.Gemma3ForConditionalGeneration(config)
    vision = sum(
        p.numel()
        for name, p in model.named_parameters()
        if "vision_tower" in name or "multi_modal_projector" in name
    )
    return out, vision


def _estimate(config) -> plan_estimate.Estimate:
    """The plan of one device (every row on it), compiled whole."""
    spec = RunSpec.of(config)
    shape = plan_estimate.model_config(spec)
    candidate = plan_estimate.Candidate(1, 1, 1, 1, 1, "full")
    subject = plan_estimate.Subject(spec, shape, extrapolate=False)
    return plan_estimate.estimate(subject, candidate, jax.devices()[:1], HARDWARE)


def test_images_are_planned_and_counted(gemma3_dir):
    """Two more image slots per row: more argument bytes (their pixels), more XLA FLOPs, and
    model FLOPs up by exactly two images' tower + projector per row (frozen: forward only).
    With adapters on the tower its activations stay for the backward: more temporaries."""
    path, _ = gemma3_dir
    plans = {}
    for slots, vision_targets in ((1, ""), (3, ""), (3, "all-linear")):
        config = config_for(path)
        config.data.max_images_per_row = slots
        if vision_targets:
            config.lora.rank, config.lora.dropout = 4, 0.0
            config.lora.vision_targets = vision_targets
        plans[slots, vision_targets] = _estimate(config)
    one, three, adapted = plans[1, ""], plans[3, ""], plans[3, "all-linear"]
    extra_pixels = ROWS * 2 * 3 * 28 * 28 * 4  # 2 more slots a row
    assert three.memory.arguments - one.memory.arguments >= extra_pixels
    assert three.xla_flops > one.xla_flops
    shape = plan_estimate.model_config(RunSpec.of(config_for(path)))
    image = vision_flops.gemma3_image_flops(shape.vision, shape.hidden_size)
    added = 2 * image * ROWS
    assert three.model_flops - one.model_flops == pytest.approx(added, rel=1e-9)
    assert adapted.memory.temporaries > three.memory.temporaries
    assert adapted.xla_flops > three.xla_flops


def test_vision_weights_split_like_the_decoder_and_reported(gemma3_dir):
    """On data 2 x fsdp 2 x tensor 2 the SigLIP q_proj is split [embed: fsdp, heads: tensor] as
    the decoder's; the report names transformers' parameter count and the bytes."""
    path, hf_count = gemma3_dir
    config = config_for(path)
    config.data.max_images_per_row = 2
    config = RunSpec.of(config)
    shape = plan_estimate.model_config(config)
    model, trainable = plan_estimate.abstract_run_model(config, shape)
    mesh = sharding.make_mesh(2, 2, 2)
    params = sharding.abstract_params(model, mesh, vision_plan.VISION)
    q_proj = params["vision"]["tower"]["layers"][0]["q_proj"]["kernel"]
    assert q_proj.sharding.spec == PartitionSpec("fsdp", "tensor")
    lines = vision_plan.report(config, model, trainable, mesh, "2x2x2")
    whole = f"{hf_count * 4 / 1024:.3g} KiB"
    assert f"{hf_count:,} parameters (frozen): {whole}" in lines[0]
    assert "pixel_values (2, 3, 28, 28)" in lines[1]


@pytest.mark.e2e
def test_plan_command_prints_the_vision_part(gemma3_dir):
    path, hf_count = gemma3_dir
    out = _plan_command(path, "--meshes=2x2x2", "--remat=full", "--accumulation=1")
    assert out.returncode == 0, out.stderr[-2000:]
    vision = [line for line in out.stdout.splitlines() if line.startswith("vision:")]
    assert len(vision) == 2 and f"{hf_count:,} parameters" in vision[0], out.stdout[-3000:]
