"""The pre-flight planner (sft_jax.cli.plan, sft_jax.planning.search): compiles from config.json
alone, counts collectives as the textbook does, recommends a clean mesh, refuses clearly."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from hf_models import hf_config, save_hf_model
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from test_step import SEQ_LEN
from test_trainer import base_config, synthetic_source

from configs import base
from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.loop import trainer
from sft_jax.planning import estimate as plan_estimate
from sft_jax.planning import hlo_stats
from sft_jax.planning import search as plan_search
from sft_jax.train import kernel_choice

REPO = Path(__file__).resolve().parents[2]
ROWS, SEQ = 8, 32  # the global batch of every test: 8 rows of 32 tokens


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama's config.json and nothing else: the planner reads no weights."""
    out = tmp_path_factory.mktemp("llama")
    hf_config("llama3.1").save_pretrained(out)
    return out


def config_for(model_dir: Path):
    config = base.get_config()
    config.model.name_or_path = str(model_dir)
    config.data.max_length = SEQ
    config.train.global_batch_size = ROWS
    return config


HARDWARE = plan_estimate.Hardware(None, 100e12, 100e9)


def estimate_of(config, mesh: str, remat: str, accumulation: int = 1, **subject):
    shape = plan_estimate.model_config(RunSpec.of(config))
    sizes = plan_search.parse_mesh(mesh, jax.device_count())
    candidate = plan_estimate.Candidate(*sizes, accumulation, remat)
    subject = plan_estimate.Subject(RunSpec.of(config), shape, **subject)
    return plan_estimate.estimate(subject, candidate, jax.devices(), HARDWARE)


def test_fsdp_collectives_match_the_textbook(llama_dir):
    """FSDP over 8 devices (remat 'full'): every decoder weight is all-gathered in the forward
    and again in the backward (remat recomputes the forward), and every gradient is summed over
    the devices once. Two refinements of the textbook, both read in the HLO: the LM head is
    gathered once (its forward and backward run together, in the loss), and the embedding is
    never gathered (the lookup gathers the token ids instead)."""
    config = config_for(llama_dir)
    c = hf_config("llama3.1")
    d, f, layers, e = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim
    layer_kernels = d * e * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 3 * d * f
    head = embed = c.vocab_size * d
    norms = (2 * layers + 1) * d
    all_params = layers * layer_kernels + head + embed + norms
    float32 = 4
    gathered = float32 * (2 * layers * layer_kernels + head)
    summed = float32 * all_params  # gradients reduced once (CPU XLA: all-reduce, not RS)

    result = estimate_of(config, "1x8x1", "full")
    measured = result.collective_buffer
    grad_sync = measured["reduce-scatter"] + measured["all-reduce"]
    print(f"FSDP all-gather {measured['all-gather']:.0f} B (textbook {gathered}), gradients "
          f"{grad_sync:.0f} B (textbook {summed})")  # fmt: skip
    assert measured["all-gather"] == pytest.approx(gathered, rel=0.10)
    assert grad_sync == pytest.approx(summed, rel=0.10)
    assert result.involuntary_remats == 0


def test_tensor_parallel_collectives_match_the_textbook(tmp_path):
    """Megatron-style tensor parallelism over 8 devices: per layer the two row-parallel outputs
    (o_proj, down_proj) are all-reduced in the forward, and the input gradient of each
    column-parallel projection (q, k, v, gate, up: 5 here, unfused) in the backward; plus the
    vocabulary-parallel embedding's output (forward) and the LM head's input gradient
    (backward). Each is a [batch, seq, hidden] float32 activation."""
    c = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=8, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    c.save_pretrained(tmp_path)
    activation = 4 * ROWS * SEQ * c.hidden_size
    textbook = activation * (7 * c.num_hidden_layers + 2)

    result = estimate_of(config_for(tmp_path), "1x1x8", "none")
    measured = result.collective_buffer
    print(f"tensor-parallel all-reduce {measured['all-reduce']:.0f} B (textbook {textbook})")
    assert measured["all-reduce"] == pytest.approx(textbook, rel=0.10)
    others = sum(v for k, v in measured.items() if k != "all-reduce")
    assert others < 0.10 * textbook
    assert result.involuntary_remats == 0


def _plan_command(model_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the command sets up its own fake devices from --devices
    command = [sys.executable, "-m", "sft_jax.plan", "--config=configs/base.py", "--devices=8",
               f"--config.model.name_or_path={model_dir}", f"--config.data.max_length={SEQ}",
               f"--config.train.global_batch_size={ROWS}", *flags]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_recommended_mesh_compiles_without_involuntary_rematerialization(llama_dir):
    """On 8 devices the demo model's meshes, data=2 x fsdp=2 x tensor=2 among them (it warned
    twice before the embedding lookup was laid out like the batch), compile without a single
    warning in the compiler's log; the planner's table counts what XLA wrote to stderr, and its
    recommendation, compiled again in a fresh process, makes the compiler warn nothing."""
    planned = _plan_command(llama_dir, "--meshes=2x2x2,1x8x1,1x4x2", "--remat=none",
                            "--accumulation=1,2", "--device_memory=16GB",
                            "--exhaustive")  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-2000:]
    rows = [line for line in planned.stdout.splitlines() if re.match(r"\d+x\d+x\d+ ", line)]
    assert len(rows) == 5  # 1x8x1 cannot split 8 rows into 2 micro-batches over 8 devices
    warned = [int(row.split("|")[-2]) for row in rows]  # the column before "layers"
    assert sum(warned) == planned.stderr.count(hlo_stats.INVOLUNTARY) == 0
    flags = re.search(r"^flags: (.*)$", planned.stdout, re.M).group(1).split()
    chosen = {f.split("=")[0].rsplit(".", 1)[1]: f.split("=")[1] for f in flags}
    mesh = f"{chosen['data']}x{chosen['fsdp']}x{chosen['tensor']}"

    again = _plan_command(llama_dir, f"--meshes={mesh}", f"--remat={chosen['remat']}",
                          f"--accumulation={chosen['gradient_accumulation_steps']}")  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert hlo_stats.INVOLUNTARY not in again.stderr


def test_the_compiler_log_counts_involuntary_rematerialization():
    """What the planner counts: a reshape the partitioner can only do by replicating."""
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("a", "b"))
    rows = NamedSharding(mesh, PartitionSpec(("a", "b"), None))

    def regroup(x):
        x = x.reshape(4, 2, x.shape[-1])
        groups = NamedSharding(mesh, PartitionSpec(("a", "b"), None, None))
        return jax.lax.with_sharding_constraint(x, groups)

    with hlo_stats.compiler_log() as lines:
        jax.jit(regroup, in_shardings=rows).lower(
            jax.ShapeDtypeStruct((8, 32), "float32")
        ).compile()
    assert sum(hlo_stats.INVOLUNTARY in line for line in lines) == 1


def test_a_mesh_the_devices_cannot_form_is_a_clear_error():
    with pytest.raises(
        ConfigError, match=r"mesh .3x1x1.: 8 devices cannot be split.*include 8x1x1"
    ):
        plan_search.parse_mesh("3x1x1", 8)
    with pytest.raises(ConfigError, match="expected DATAxFSDPxTENSOR"):
        plan_search.parse_mesh("2x4", 8)
    assert plan_search.parse_mesh("2x-1x2", 8) == (2, 2, 2, 1)
    assert plan_search.parse_mesh("1x2x4x1", 8) == (1, 2, 1, 4)  # data x fsdp x expert x tensor


def test_a_model_that_fits_nowhere_names_the_closest_candidates(llama_dir):
    config = config_for(llama_dir)
    tiny = plan_estimate.Hardware(64 * 1024, 100e12, 100e9)  # 64 KiB per device
    with pytest.raises(ConfigError) as raised:
        plan_search.plan(RunSpec.of(config), jax.devices(), tiny, meshes=["1x8x1"],
                         remats=["none", "full"], accumulations=[1])  # fmt: skip
    message = str(raised.value)
    assert "no candidate fits" in message
    # Its weights and optimizer state alone overflow 64 KiB: not even compiled.
    assert re.search(r"mesh 1x8x1: weights and optimizer state alone [\d.]+ [KMG]iB", message)
    assert "gradient_accumulation_steps" in message


def test_collective_parser_counts_loop_trips_and_tuples():
    hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8,4]{1,0} all-gather(%x), replica_groups=[2,4]<=[8], dimensions={0}
}

ENTRY %main (a: f32[2]) -> f32[] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ar = (f32[16]{0}, bf16[4,4]{1,0}) all-reduce(%a, %b), replica_groups={{0,1,2,3,4,5,6,7}}
  %rs = f32[2]{0} reduce-scatter(%c), replica_groups=mesh['x'=2,'y'=4] {'y'}, dimensions={0}
}
"""  # noqa: E501
    buffer, wire = hlo_stats.collective_bytes(hlo, 8)
    assert buffer["all-gather"] == 3 * 8 * 4 * 4  # three trips of a 128-byte gather
    assert wire["all-gather"] == pytest.approx(3 * 128 * 3 / 4)  # groups of 4
    assert buffer["all-reduce"] == 16 * 4 + 16 * 2
    assert buffer["reduce-scatter"] == 2 * 4 * 4  # its input: the result times the group


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama_weights")
    save_hf_model("llama3.1", out)
    return out


@pytest.mark.e2e
def test_training_logs_the_mesh_first_and_auto_takes_the_planners_pick(
    weights_dir, tmp_path, monkeypatch, caplog
):
    """With config.mesh.auto the run trains on the mesh the planner recommends (here of two
    candidate meshes), and its first log line names the mesh and why."""
    monkeypatch.setattr(
        plan_search, "factorizations", lambda devices, experts: [(2, 2, 2, 1), (1, 8, 1, 1)]
    )
    config = base_config(weights_dir, steps=1)
    config.data.max_length = SEQ_LEN
    config.eval.at_start, config.eval.every_steps = False, 0
    hardware = plan_estimate.Hardware(None, 989e12, plan_search.DEFAULT_INTERCONNECT)
    expected = plan_search.plan(RunSpec.of(config), jax.devices(), hardware, target="cpu").best
    config.mesh.auto = True
    with caplog.at_level(logging.INFO, logger="sft_jax"):
        trainer.run(config, tmp_path, data_factory=lambda *_: synthetic_source())
    first = next(r.getMessage() for r in caplog.records if r.name.startswith("sft_jax"))
    c = expected.candidate
    assert first.startswith(
        f"mesh: data={c.data} fsdp={c.fsdp} expert=1 context=1 tensor={c.tensor}: 8 cpu devices "
        "in 1 process; "
        "config.mesh.auto: the planner's pick"
    ), first

    caplog.clear()
    config.mesh.auto = False
    config.mesh.data, config.mesh.fsdp = 2, 4
    with caplog.at_level(logging.INFO, logger="sft_jax"):
        trainer.run(config, tmp_path / "fixed", data_factory=lambda *_: synthetic_source())
    first = next(r.getMessage() for r in caplog.records if r.name.startswith("sft_jax"))
    assert (
        first == "mesh: data=2 fsdp=4 expert=1 context=1 tensor=1: 8 cpu devices in 1 process; "
        "as configured (config.mesh)"
    )


def test_mesh_fields_are_checked_before_a_mesh_is_built(llama_dir):
    from sft_jax.train.config_check import check_mesh

    config = config_for(llama_dir)
    config.mesh.auto = True
    check_mesh(RunSpec.of(config))  # auto with the default axes: fine
    config.mesh.data, config.mesh.fsdp = -1, -1
    with pytest.raises(ConfigError, match=r"config.mesh.data=-1: .*at most one -1.*mesh.auto=True"):
        check_mesh(RunSpec.of(config))


def _measured(shape: str) -> dict:
    """benchmarks/plan_memory.py's reading of one shape, in a fresh process."""
    devices = "" if shape == "small" else "--xla_force_host_platform_device_count=8"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": devices,
           "PYTHONPATH": os.pathsep.join((str(REPO), str(REPO / "tests")))}  # fmt: skip
    out = subprocess.run([sys.executable, "benchmarks/plan_memory.py", shape], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    return result


@pytest.mark.e2e
def test_planned_memory_is_within_15_percent_of_the_measured_peak():
    """XLA's plan of a train step (temporaries and new outputs) against the peak resident set
    the step adds to a fresh CPU process (benchmarks/plan_memory.py says how it measures; it
    runs five shapes, this test the smallest)."""
    result = _measured("small")
    assert result["predicted"] == pytest.approx(result["measured"], rel=0.15)


@pytest.mark.e2e
def test_fsdp_lora_plan_gathers_weights_where_used_and_is_the_measured_peak():
    """LoRA on fsdp=8, where the all-gathered frozen weights dominate the step: compiled by the
    planner from config.json and then run on random weights, the step adds to the process
    (per device) within 15% of what the plan says. XLA:CPU's default scheduler starts every
    all-gather (the forward's and the remat recomputation's) at the top of the program and
    holds all layers' gathered weights at once: the planner's memory-optimized schedule
    (memory_plan.PLAN_COMPILER_OPTIONS) plans at most two thirds of its temporaries."""
    result = _measured("fsdp_lora")
    assert result["predicted"] == pytest.approx(result["measured"], rel=0.15)
    assert result["default_scheduler_temporaries"] > 1.5 * result["temporaries"]


@pytest.mark.e2e
def test_moe_lora_plan_with_the_grouped_matmul_stand_in_is_the_measured_peak():
    """A mixture of experts (32 experts, top-k of qwen3_moe's tiny config) with LoRA on
    fsdp=2 x expert=4, planned with the grouped-matmul stand-in the planner compiles for
    ragged_dot (plan_estimate.planned_experts), then run: within 15% of the measured peak."""
    result = _measured("moe_lora")
    assert result["predicted"] == pytest.approx(result["measured"], rel=0.15)


def test_shallow_compiles_extrapolate_to_the_full_depth(tmp_path):
    """An 8-layer model planned from compiles with 2 and 4 layers: memory, XLA's FLOPs and each
    collective kind within 3% of compiling all 8 layers."""
    hf = hf_config("llama3.1")
    hf.num_hidden_layers = 8
    hf.save_pretrained(tmp_path)
    config = config_for(tmp_path)
    whole = estimate_of(config, "2x4x1", "full", extrapolate=False)
    line = estimate_of(config, "2x4x1", "full")
    assert (line.depths, line.layers, whole.depths) == ((2, 4), 8, None)
    print(f"memory {line.memory_bytes} extrapolated vs {whole.memory_bytes} compiled")
    assert line.memory_bytes == pytest.approx(whole.memory_bytes, rel=0.03)
    assert line.xla_flops == pytest.approx(whole.xla_flops, rel=0.03)
    for kind, compiled in whole.collective_buffer.items():
        assert line.collective_buffer[kind] == pytest.approx(compiled, rel=0.03, abs=1024), kind


def test_a_fused_kernel_is_planned_with_the_blockwise_stand_in(llama_dir):
    config = config_for(llama_dir)
    shape = plan_estimate.model_config(RunSpec.of(config))
    config.model.compute_dtype = "bfloat16"
    assert plan_estimate.planned_attention(RunSpec.of(config), shape, "nvidia") == (
        "blockwise",
        "attention: cudnn on the target, planned with the blockwise stand-in",
    )
    config.data.max_length = 256
    assert plan_estimate.planned_attention(RunSpec.of(config), shape, "tpu")[1] == (
        "attention: splash on the target, planned with the blockwise stand-in"
    )
    assert plan_estimate.planned_attention(RunSpec.of(config), shape, "cpu")[0] == "xla"


def test_the_planner_and_the_run_choose_the_same_kernel_for_prefix_tuning(llama_dir):
    """Prefix tuning's key/value prefix needs the einsum path on every target: the planner
    compiles what the run will run (one rule, kernel_choice.forced_attention)."""
    config = config_for(llama_dir)
    config.model.compute_dtype = "bfloat16"
    config.prompt.method = "prefix_tuning"
    spec = RunSpec.of(config)
    shape = plan_estimate.model_config(spec)
    for target in ("nvidia", "tpu", "cpu"):
        planned, line = plan_estimate.planned_attention(spec, shape, target)
        assert planned == "xla" and "prefix tuning" in line
    assert kernel_choice.attention_for(spec, shape, max_segments=0)[0] == "xla"


def test_mixtures_of_experts_search_the_expert_axis(tmp_path):
    """qwen3_moe's 4 experts on 8 devices: meshes with expert = 2 and 4 are candidates (8 does
    not divide the experts), and one compiles cleanly with the experts split."""
    hf_config("qwen3_moe").save_pretrained(tmp_path)
    config = config_for(tmp_path)
    shape = plan_estimate.model_config(RunSpec.of(config))
    found = plan_search.candidates(8, ROWS, shape, remats=["none"], accumulations=[1])
    experts = {c.expert for c in found}
    assert experts == {1, 2, 4}
    assert "1x2x4x1" in {c.mesh for c in found}
    split = estimate_of(config, "1x2x4x1", "none")
    assert split.involuntary_remats == 0
    assert "--config.mesh.expert=4" in split.candidate.flags()


def test_grouped_matmul_stand_in_plans_no_per_expert_temporaries(tmp_path):
    """models/grouped_matmul.py compiled in place of ragged_dot (which XLA:CPU lowers to a
    dense product per expert over every token copy): at fixed tokens and top-k, four times the
    experts add to the planned temporaries no more than the gradients of the added expert
    weights (full fine-tune), where ragged_dot adds several times that; the planner compiles
    it for every mixture of experts (planned_experts)."""
    shapes, planned = {}, {}
    for experts in (4, 16):
        model_dir = tmp_path / str(experts)
        hf_config(
            "qwen3_moe", num_experts=experts, num_hidden_layers=1, mlp_only_layers=[]
        ).save_pretrained(model_dir)
        config = config_for(model_dir)
        shapes[experts] = plan_estimate.model_config(RunSpec.of(config))
        for kind in ("padded_blocks", "ragged_dot")[: 1 if experts == 4 else 2]:
            line = estimate_of(config, "8x1x1", "none", experts=kind, extrapolate=False)
            planned[experts, kind] = line.memory.temporaries
    assert plan_estimate.planned_experts(shapes[4], "nvidia")[0] == "padded_blocks"
    shape = shapes[4]
    added_weight_bytes = 12 * 3 * shape.hidden_size * shape.moe_intermediate_size * 4
    stand_in_growth = planned[16, "padded_blocks"] - planned[4, "padded_blocks"]
    dense_growth = planned[16, "ragged_dot"] - planned[4, "padded_blocks"]
    print(f"added expert weights {added_weight_bytes} B; temporaries grew {stand_in_growth} B "
          f"with the stand-in, {dense_growth} B with ragged_dot")  # fmt: skip
    assert stand_in_growth <= 1.25 * added_weight_bytes
    assert dense_growth > 4 * added_weight_bytes


@pytest.mark.e2e
def test_a_grpo_plan_reports_the_sampler_beside_the_update(llama_dir):
    """Online RL: the update step is planned on rows of prompt + completion tokens, and the
    sampler's memory on the recommended mesh is reported with the longest completion that
    fits (train/memory.check_rollout, which the run applies before sampling)."""
    planned = _plan_command(
        llama_dir, "--config.train.objective=grpo", "--config.grpo.num_generations=4",
        "--config.data.train_files=assets/demo_data/grpo_train.jsonl",
        "--config.grpo.max_prompt_length=32", "--config.grpo.max_completion_length=16",
        "--meshes=1x8x1", "--remat=none", "--device_memory=16GB",
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-2000:]
    out = planned.stdout
    assert re.search(
        rf"^sampler: {ROWS} rows \({ROWS // 4} prompts x 4 completions\) x \(32 prompt \+ 16 "
        r"completion\) tokens: [\d.]+ [KMG]iB per device",
        out,
        re.M,
    ), out
    assert re.search(
        r"^longest completion that fits with these rows: 128 tokens or more$", out, re.M
    )
