"""The training loop: eval against transformers, metrics files, early stop, divergence, hosts."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import hf_logits
from test_step import SEQ_LEN, synthetic_batch

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.loop import trainer
from sft_jax.models import from_pretrained
from sft_jax.train import compiled as compile_plan
from sft_jax.train import memory as memory_plan
from sft_jax.workdir.checkpointing import Checkpoints
from sft_jax.workdir.rundir import checkpoint_dir

REPO = Path(__file__).resolve().parents[2]


def base_config(model_dir: Path, **train) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("base_config", REPO / "configs" / "base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.name_or_path = str(model_dir)
    config.train.steps = 6
    config.train.global_batch_size = 8
    config.train.warmup_steps = 1
    config.train.loss_chunk_size = 4
    config.eval.global_batch_size = 8
    config.eval.every_steps = 3
    config.log.every_steps = 1
    config.mesh.fsdp = 1
    config.mesh.data = -1
    config.checkpoint.enabled = False
    config.export.at_end = "none"
    for key, value in train.items():
        config.train[key] = value
    return config


class SyntheticBatches:
    """Batch n is synthetic_batch(n); its state is the next n."""

    def __init__(self, transform=lambda batch: batch):
        self.position, self.transform = 0, transform

    def __next__(self) -> dict[str, np.ndarray]:
        self.position += 1
        return self.transform(synthetic_batch(self.position - 1))

    def get_state(self) -> dict[str, int]:
        return {"position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def synthetic_source(eval_seeds=(100, 101)) -> trainer.DataSource:
    return trainer.DataSource(
        train_batches=SyntheticBatches(),
        eval_batches=lambda: [synthetic_batch(seed) for seed in eval_seeds],
        seq_len=SEQ_LEN,
    )


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint):
    return hf_checkpoint("llama3.1")[0]


def reference_eval_loss(model_dir: Path, batches) -> float:
    """Token-weighted mean cross-entropy computed with the transformers model, per document."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager"
    ).eval()
    nll, count = 0.0, 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            for segment in set(batch["segment_ids"][row]) - {0}:
                where = batch["segment_ids"][row] == segment
                logits = torch.as_tensor(
                    hf_logits(model, batch["input_ids"][row][where][None])[0], dtype=torch.float64
                )
                log_probs = torch.log_softmax(logits, dim=-1).numpy()
                targets, mask = batch["target_ids"][row][where], batch["target_mask"][row][where]
                nll -= log_probs[np.arange(len(targets)), targets][mask].sum()
                count += int(mask.sum())
    return nll / count


def test_eval_loss_at_step_zero_matches_transformers(model_dir, tmp_path):
    source = synthetic_source()
    config = base_config(model_dir)
    run = trainer.Trainer(RunSpec.of(config), tmp_path, from_pretrained(model_dir), source)
    metrics = run.run_eval(0)
    expected = reference_eval_loss(model_dir, source.eval_batches())
    assert metrics["eval/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.e2e
def test_training_logs_metrics_and_learns(model_dir, tmp_path):
    source = synthetic_source()
    repeated = synthetic_batch(0)
    source.train_batches = SyntheticBatches(lambda _: repeated)
    config = base_config(model_dir, steps=12, learning_rate=3e-3)
    config.log.peak_tflops_per_device = 1e-3  # 1 GFLOP/s per device, so MFU is reported on CPU
    model = from_pretrained(model_dir)
    # Model FLOPs per token by hand: 6 x the weights in matrix products (every kernel and the
    # head; the embedding lookup is not a product) + causal attention 6 x layers x T x H x E.
    kernels = sum(v.get_value().size for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                  if p[-1] == "kernel")  # fmt: skip
    c = model.config
    expected_flops = 6 * (kernels + c.vocab_size * c.hidden_size) + 6 * c.num_layers * (
        SEQ_LEN * c.num_heads * c.head_dim
    )
    run = trainer.Trainer(RunSpec.of(config), tmp_path, model, source)
    assert run.flops_per_token == expected_flops
    summary = run.train()
    run.writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    for r in train_records:
        achieved = r["train/tokens_per_sec"] * expected_flops / jax.device_count()
        assert r["train/mfu"] == pytest.approx(achieved / 1e9, rel=1e-6)
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert {
        "train/grad_norm",
        "train/learning_rate",
        "train/tokens_per_sec",
        "train/target_tokens",
    } <= set(train_records[0])
    assert train_records[0]["train/target_tokens"] == repeated["target_mask"].sum()
    eval_steps = [r["step"] for r in records if "eval/loss" in r]
    assert eval_steps == [0, 3, 6, 9, 12]
    assert train_records[-1]["train/loss"] < 0.5 * train_records[0]["train/loss"]
    assert summary["end_step"] == 12 and not summary["stopped_early"]
    # TensorBoard holds the same numbers as metrics.jsonl.
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for record in records:
        for key, value in record.items():
            if isinstance(value, float | int) and key != "step":
                assert scalars[(key, record["step"])] == pytest.approx(value, rel=1e-6), key


def tensorboard_scalars(directory: Path) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar in the event files (TFRecord framing, Event protos)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in directory.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars[(value.tag, event.step)] = value.simple_value
    assert scalars, f"no TensorBoard scalars in {directory}"
    return scalars


@pytest.mark.e2e
def test_early_stopping_records_best_step(model_dir, tmp_path):
    # The learning test's steps and rate (neither matters here): its compiled step is reused.
    config = base_config(model_dir, steps=12, learning_rate=3e-3)
    config.eval.early_stopping_patience = 2
    config.eval.early_stopping_min_delta = (
        1e9  # nothing counts as an improvement after the first eval
    )
    run = trainer.Trainer(
        RunSpec.of(config), tmp_path, from_pretrained(model_dir), synthetic_source()
    )
    summary = run.train()
    assert summary["stopped_early"] and summary["end_step"] == 6
    assert summary["best_step"] == 0


@pytest.mark.e2e
def test_best_and_patience_survive_a_restart_and_step_0_can_be_the_export(
    model_dir, tmp_path, monkeypatch
):
    """Scripted eval losses: 1.0 at step 0 (best), then worse. A restart after step 4 keeps the
    count of evals without improvement, stops at step 6, and the export is step 0's model."""
    scripted = iter([1.0, 1.5, 1.7, 1.6])
    monkeypatch.setattr(trainer, "evaluate", lambda *a: {"eval/loss": next(scripted)})
    config = base_config(model_dir, steps=4)
    config.eval.every_steps = 2
    config.eval.early_stopping_patience = 3
    config.checkpoint.enabled = True
    config.checkpoint.keep_last = 1

    def run(steps):
        config.train.steps = steps
        run = trainer.Trainer(
            RunSpec.of(config), tmp_path, from_pretrained(model_dir), synthetic_source()
        )
        run.resume()
        summary = run.train()
        run.close()
        return summary

    first = run(4)
    assert not first["stopped_early"] and first["best_step"] == 0
    assert Checkpoints(checkpoint_dir(tmp_path), read_only=True).steps() == [0, 4]
    second = run(10)  # resumes at 4: one more eval without improvement makes 3
    assert second["start_step"] == 4 and second["stopped_early"] and second["end_step"] == 6
    assert second["best_step"] == 0 and second["initial_eval"]["eval/loss"] == 1.0
    assert "eval loss 1.0000 -> 1.6000" in trainer.final_report(second)
    checkpoints = Checkpoints(checkpoint_dir(tmp_path), read_only=True)
    assert 0 in checkpoints.steps() and checkpoints.best_step() == 0


@pytest.mark.e2e
def test_auto_attention_falls_back_to_einsums_when_the_kernel_does_not_compile(
    model_dir, tmp_path, monkeypatch, caplog
):
    """A fused kernel that this GPU's cuDNN refuses (as cuDNN can, at compile time, for shapes
    and masks it has no engine for) costs "auto" speed, not the run; a named kernel fails."""
    import logging

    from sft_jax.models.kernels import fused as kernels

    def refuses(*args, **kwargs):
        raise NotImplementedError("no cuDNN engine supports this graph")

    monkeypatch.setitem(kernels.PACKED_KERNEL, "fn", refuses)
    picks_cudnn = lambda config, model, max_segments: ("cudnn", "as if on a GPU")  # noqa: E731
    monkeypatch.setattr(compile_plan, "attention_for", picks_cudnn)
    config = base_config(model_dir, steps=2)
    config.eval.at_start = False
    config.model.attention = "auto"  # as if it had picked cudnn on a GPU
    model = from_pretrained(model_dir, attention="cudnn", max_segments=4)
    with caplog.at_level(logging.WARNING, logger="sft_jax.train.compiled"):
        run = trainer.Trainer(RunSpec.of(config), tmp_path / "auto", model, synthetic_source())
    assert "attention 'cudnn' did not compile (NotImplementedError: no cuDNN engine" in caplog.text
    assert model.config.attention == "xla"
    einsum_run = trainer.Trainer(RunSpec.of(config), tmp_path / "xla", from_pretrained(model_dir),
                                 synthetic_source())  # fmt: skip
    assert run.train()["final_eval"] == einsum_run.train()["final_eval"]
    config.model.attention = "cudnn"
    with pytest.raises(NotImplementedError, match="no cuDNN engine"):
        trainer.Trainer(RunSpec.of(config), tmp_path / "named",
                        from_pretrained(model_dir, attention="cudnn", max_segments=4),
                        synthetic_source())  # fmt: skip


@pytest.mark.e2e
def test_non_finite_loss_stops_naming_the_step(model_dir, tmp_path):
    model = from_pretrained(model_dir)
    model.final_norm.scale[...] = jnp.full_like(model.final_norm.scale[...], jnp.nan)
    config = base_config(model_dir, steps=12, learning_rate=3e-3)  # the learning test's step
    config.eval.at_start = False
    run = trainer.Trainer(RunSpec.of(config), tmp_path, model, synthetic_source())
    with pytest.raises(trainer.TrainingDivergedError, match=r"step 1: loss nan"):
        run.train()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    model_dir: Path, workdir: Path, processes: int, devices_each: int, **worker_env: str
) -> list[dict]:
    """Runs tests/multihost_worker.py in `processes` processes; each one's last line, parsed."""
    port = _free_port()
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
        JAX_PLATFORMS="cpu",
        **worker_env,
    )
    script = Path(__file__).parents[1] / "multihost_worker.py"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(model_dir),
                str(workdir / str(i)),
                str(i),
                str(processes),
                str(port),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.splitlines()[-1]) for out, _ in outputs]


@pytest.mark.e2e
def test_two_processes_equal_one(model_dir, tmp_path):
    """2 processes x 2 CPU devices (jax.distributed over loopback, gloo) == 1 process x 4."""
    (single,) = _launch(model_dir, tmp_path / "one", processes=1, devices_each=4)
    double, _ = _launch(model_dir, tmp_path / "two", processes=2, devices_each=2)
    np.testing.assert_allclose(double["losses"], single["losses"], rtol=2e-5)
    np.testing.assert_allclose(double["eval_loss"], single["eval_loss"], rtol=2e-5)
    assert jax.process_count() == 1


@pytest.mark.e2e
def test_a_signal_to_one_process_stops_every_process_at_the_same_step(model_dir, tmp_path):
    """Preemption of one host: SIGTERM reaches process 1 alone, after step 3. Both processes
    agree (a vote on the devices, read a step later) and stop at the same step, where the
    trainer saves (test_resume.py checks that save; here checkpointing is off, as processes
    with separate workdirs share no checkpoint folder)."""
    results = _launch(model_dir, tmp_path, processes=2, devices_each=2, WORKER_STEPS="12",
                      WORKER_SIGTERM="1:3")  # fmt: skip
    assert [r["interrupted"] for r in results] == [True, True]
    # Signalled while step 4 runs (step 3's metrics are logged after step 4 is dispatched);
    # the vote taken before step 5 says stop, and is read before step 6: both end at step 5.
    assert [r["end_step"] for r in results] == [5, 5]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny Llama whose vocabulary fits a locally built ChatML tokenizer, saved with it."""
    from chat_tokenizers import make_tokenizer
    from hf_models import save_tiny_llama

    path = tmp_path_factory.mktemp("chat_llama")
    save_tiny_llama(path, make_tokenizer("chatml"))
    return path


def chat_rows(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        turns = [
            {"role": "user", "content": f"Add {a} and {b}"},
            {"role": "assistant", "content": f"Answer {a + b}"},
        ] * int(rng.integers(1, 4))
        rows.append({"messages": turns})  # fmt: skip
    return rows


def test_eval_loss_is_the_same_packed_or_padded(chat_model_dir, tmp_path):
    from sft_jax.data import open_data

    for name, seed in (("train", 0), ("eval", 1)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in chat_rows(37, seed))
        )
    losses = {}
    for packing in (True, False):
        config = base_config(chat_model_dir)
        config.data.train_files = str(tmp_path / "train.jsonl")
        config.data.eval_files = str(tmp_path / "eval.jsonl")
        config.data.max_length = 256  # several documents to a packed row
        config.data.packing = packing
        config.data.cache_dir = "none"
        source = open_data(RunSpec.of(config))
        # The segments per row the model is built for: the most the batches ever hold, over
        # eval and two train epochs (the second packs no row fuller than the first).
        batches = list(source.eval_batches())
        two_epochs = -(-2 * source.train_batches.rows_per_epoch() // config.train.global_batch_size)
        batches += [next(source.train_batches) for _ in range(two_epochs)]
        documents = max(int(b["segment_ids"].max()) for b in batches)
        assert source.max_segments == documents + 1
        assert documents > 1 if packing else documents == 1
        spec = RunSpec.of(config)
        run = trainer.Trainer(spec, tmp_path / str(packing), from_pretrained(chat_model_dir),
                              source)  # fmt: skip
        losses[packing] = run.run_eval(0)
        if packing:
            expected = reference_eval_loss(chat_model_dir, source.eval_batches())
    assert losses[True]["eval/target_tokens"] == losses[False]["eval/target_tokens"]
    assert losses[True]["eval/loss"] == pytest.approx(losses[False]["eval/loss"], rel=1e-5)
    assert losses[True]["eval/loss"] == pytest.approx(expected, rel=1e-5)


def test_eval_generates_samples_and_scores_exact_match(chat_model_dir, tmp_path, monkeypatch):
    from sft_jax.data import open_data
    from sft_jax.generation import samples

    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(6, 1)))
    config = base_config(chat_model_dir)
    config.data.train_files = config.data.eval_files = str(tmp_path / "eval.jsonl")
    config.data.max_length = 64
    config.data.cache_dir = "none"
    config.eval.generate_examples = 6
    config.eval.show_samples = 2
    config.eval.max_new_tokens = 8
    source = open_data(RunSpec.of(config))
    run = trainer.Trainer(RunSpec.of(config), tmp_path, from_pretrained(chat_model_dir), source)
    metrics = run.run_eval(0)
    assert metrics["eval/generated"] == 6 and 0.0 <= metrics["eval/exact_match"] <= 1.0
    reference = source.tokenizer.decode(source.eval_prompts[0][1], skip_special_tokens=True)
    assert metrics["eval/samples"].count("--- sample") == 2
    assert f">>> reference: {reference}" in metrics["eval/samples"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["eval/samples"] == metrics["eval/samples"]

    # A model that says exactly the references scores 100%; one wrong reply costs 1/6.
    replies = [list(reply) for _, reply in source.eval_prompts]
    replies[3] = replies[3][:1]
    monkeypatch.setattr(samples, "generate", lambda *args, **kwargs: replies)
    assert run.run_eval(0)["eval/exact_match"] == pytest.approx(5 / 6)


@pytest.mark.e2e
def test_lora_with_dropout_resumes_exactly(model_dir, tmp_path, monkeypatch):
    """Dropout keys come from (seed, step): a run stopped (as by SIGTERM) after step 3 and
    resumed logs the same losses, bitwise, as one that ran straight through."""
    from sft_jax.train import sharding
    from sft_jax.train.setup import build_model

    class StopAfter3(trainer.StopSignal):
        checks = 0

        def agreed(self) -> bool:
            StopAfter3.checks += 1
            return StopAfter3.checks > 3

    def run(workdir, steps=6):
        config = base_config(model_dir, steps=steps, learning_rate=3e-3)
        config.lora.rank, config.lora.dropout = 4, 0.3
        config.checkpoint.enabled, config.checkpoint.every_steps = True, 3
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
        model, _, trainable = build_model(RunSpec.of(config), mesh)
        run = trainer.Trainer(RunSpec.of(config), workdir, model, synthetic_source(), trainable)
        run.resume()
        run.train()
        run.close()
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "train/loss" in r]

    straight = run(tmp_path / "straight")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "StopSignal", StopAfter3)
        assert run(tmp_path / "stopped")[-1][0] == 3
    resumed = run(tmp_path / "stopped")
    assert resumed == straight and len(straight) == 6


def test_a_step_planned_beyond_the_device_warns_before_it_runs(caplog):
    """XLA's memory plan of the compiled step is logged; one over the device's limit warns,
    naming what lowers it, instead of leaving the user to a RESOURCE_EXHAUSTED mid-step."""
    from sft_jax.train.memory import StepMemory, warn_if_over_memory

    plan = StepMemory(arguments=6 << 30, outputs=5 << 30, aliased=5 << 30, temporaries=4 << 30,
                      code=0)  # fmt: skip
    assert plan.total == 10 << 30
    with caplog.at_level("INFO", logger="sft_jax.train.memory"):
        warn_if_over_memory(plan, 16 << 30, "none")
        warn_if_over_memory(plan, None, "none")  # CPU: no limit known
    assert "10.00 GiB per device" in caplog.text and "WARNING" not in caplog.text
    for remat, advice in (("none", True), ("full", False)):
        caplog.clear()
        with caplog.at_level("INFO", logger="sft_jax.train.memory"):
            warn_if_over_memory(plan, 8 << 30, remat)
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert "plans 10.00 GiB per device but the device holds 8.00 GiB" in warnings[0]
        assert "gradient_accumulation_steps" in warnings[0]
        assert ("config.model.remat='auto'" in warnings[0]) == advice


OUT_OF_MEMORY = (
    "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
    "hbm. Used 17.31G of 15.48G hbm."
)


def test_auto_remat_moves_on_when_the_compiler_runs_out_of_memory():
    """XLA:TPU refuses a program too large for the device at compile time instead of planning
    it: "auto" takes that as "does not fit"; a named policy, or nothing fitting, is an error
    that says what lowers memory; any other compile error is raised as it is."""

    class Model:
        remat = "none"

    def build(fits: set[str]):
        def compile_(model):
            if model.remat not in fits:
                raise RuntimeError(OUT_OF_MEMORY)
            return compile_plan.Steps(None, None, None, None, {}, 0.0, train_memory=None)

        return compile_

    model = Model()
    assert compile_plan.compile_with_remat(build({"full"}), model, "auto", 16 << 30) is not None
    assert model.remat == "full"
    for remat in ("none", "auto"):
        with pytest.raises(ConfigError, match=f"does not fit in device memory with "
                           f"config.model.remat='{remat}'.*Ran out of memory"):  # fmt: skip
            compile_plan.compile_with_remat(build(set()), Model(), remat, 16 << 30)

    def broken(model):
        raise ValueError("some other compile error")

    with pytest.raises(ValueError, match="some other compile error"):
        compile_plan.compile_with_remat(broken, Model(), "auto", 16 << 30)


def test_a_kernel_out_of_memory_is_not_blamed_on_the_kernel(model_dir, tmp_path, monkeypatch):
    """attention="auto" falls back to einsums when a fused kernel does not compile, but not when
    the compile ran out of memory: einsums need more, and the error says what lowers it."""
    from sft_jax.models.kernels import fused as kernels

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(OUT_OF_MEMORY)

    monkeypatch.setitem(kernels.PACKED_KERNEL, "fn", out_of_memory)
    picks_cudnn = lambda config, model, max_segments: ("cudnn", "as if on a GPU")  # noqa: E731
    monkeypatch.setattr(compile_plan, "attention_for", picks_cudnn)
    config = base_config(model_dir, steps=2)
    config.model.attention = "auto"  # as if it had picked cudnn on a GPU
    model = from_pretrained(model_dir, attention="cudnn", max_segments=4)
    with pytest.raises(ConfigError, match=r"does not fit in device memory.*remat='auto'"):
        trainer.Trainer(RunSpec.of(config), tmp_path, model, synthetic_source())
    assert model.config.attention == "cudnn"


def test_auto_remat_takes_the_least_recomputation_whose_step_fits():
    """remat="auto" compiles none, save_matmuls, full in turn and keeps the first whose train
    step XLA plans within FIT_FRACTION of the device's memory; with no limit known, none."""
    from hf_models import hf_config
    from test_step import step_builder

    from sft_jax.models import CausalLM, from_hf_config
    from sft_jax.train import sharding

    mesh = sharding.single_device_mesh()
    hf = hf_config("llama3.1")  # deeper and wider than the test models: activations show
    hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size = 8, 128, 512
    model = CausalLM(from_hf_config(hf), rngs=nnx.Rngs(0))
    compile_ = step_builder(model, mesh, rows=16, seq_len=64, loss_chunk_size=64)
    compiled = {}

    def build(model):  # one compile per policy
        if model.remat not in compiled:
            compiled[model.remat] = compile_(model)
        return compiled[model.remat]

    plans = {}
    for policy in compile_plan.AUTO_REMAT:
        model.remat = policy
        plans[policy] = build(model).train_memory.total
    # (XLA's CPU plan gains little from "full" over "save_matmuls"; a GPU's gains more.)
    assert plans["none"] > plans["save_matmuls"] >= plans["full"], plans

    def fits(plan: int) -> int:  # the smallest device limit that takes this plan
        return int(plan / memory_plan.FIT_FRACTION) + 1

    none, save = fits(plans["none"]), fits(plans["save_matmuls"])
    # Nothing fits: "full", the least memory there is (the warning before the first step says
    # it will not fit).
    cases = [(None, "none"), (none, "none"), (none - 2, "save_matmuls"), (save, "save_matmuls"),
             (plans["full"] // 2, "full")]  # fmt: skip
    for limit, expected in cases:
        model.remat = "none"
        steps = compile_plan.compile_with_remat(build, model, "auto", limit)
        assert (model.remat, steps.train_memory.total) == (expected, plans[expected]), limit
    model.remat = "save_matmuls"  # a named policy is kept, whatever the limit
    assert (
        compile_plan.compile_with_remat(build, model, "save_matmuls", 1).train_memory.total
        == (plans["save_matmuls"])
    )


@pytest.mark.e2e
def test_auto_remat_in_a_run_trains_as_the_policy_it_picked(model_dir, tmp_path, monkeypatch):
    config = base_config(model_dir, steps=2)
    config.eval.at_start = False
    config.model.remat = "full"
    spec = RunSpec.of(config)
    expected = trainer.Trainer(spec, tmp_path / "full", from_pretrained(model_dir, remat="full"),
                               synthetic_source()).train()  # fmt: skip
    config.model.remat = "auto"
    monkeypatch.setattr(memory_plan, "device_bytes_limit", lambda device=None: 1)  # nothing fits
    model = from_pretrained(model_dir)
    run = trainer.Trainer(RunSpec.of(config), tmp_path / "auto", model, synthetic_source())
    assert model.remat == "full"
    assert run.train()["final_eval"] == expected["final_eval"]
