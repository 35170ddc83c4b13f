"""Data and run directories in S3: a real S3 API served locally by moto (server mode)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import test_stream
from chat_tokenizers import make_tokenizer
from etils import epath
from hf_models import save_tiny_llama
from test_data import conversation, write_jsonl
from test_resume import train_losses
from test_step import train_config
from test_trainer import base_config as trainer_config
from test_trainer import chat_rows

from sft_jax.core.errors import ConfigError
from sft_jax.core.spec import RunSpec
from sft_jax.data.cloud import CloudError
from sft_jax.loop import trainer
from sft_jax.loop.export import export_run
from sft_jax.train import config_check
from sft_jax.train.setup import open_run_data
from sft_jax.workdir.bucket_mirror import MARKER, RUN_FILE, BucketMirror, staging_dir
from sft_jax.workdir.checkpointing import Checkpoints, CheckpointSaveError, committed_steps

BUCKET = "sft-data"
stream_config = test_stream.stream_config  # the fixture


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on localhost with one bucket; credentials from the environment."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    environment = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    yield client
    # moto keeps its buckets in this process's memory across servers: each test starts empty.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"))
    server.stop()


def test_training_data_is_read_from_s3_like_a_local_file(s3, stream_config, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(24)])
    s3.upload_file(str(tmp_path / "train.jsonl"), BUCKET, "chat/train.jsonl")
    local = next(open_run_data(RunSpec.of(stream_config)).train_batches)
    stream_config.data.train_files = f"s3://{BUCKET}/chat/*.jsonl"
    remote = next(open_run_data(RunSpec.of(stream_config)).train_batches)
    for key, value in local.items():
        np.testing.assert_array_equal(remote[key], value)


def test_a_missing_bucket_or_missing_credentials_name_the_path(s3, stream_config, monkeypatch):
    stream_config.data.train_files = "s3://no-such-bucket/train.jsonl"
    with pytest.raises(CloudError, match=r"s3://no-such-bucket/train\.jsonl: cannot read it"):
        open_run_data(RunSpec.of(stream_config))
    s3.put_object(Bucket=BUCKET, Key="train.jsonl", Body=b"{}\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    stream_config.data.train_files = f"s3://{BUCKET}/train.jsonl"
    with pytest.raises(CloudError, match=rf"s3://{BUCKET}/train\.jsonl: .*AWS_ACCESS_KEY_ID"):
        open_run_data(RunSpec.of(stream_config))


def test_orbax_still_writes_s3_checkpoint_arrays_to_local_disk(s3, tmp_path, monkeypatch):
    """Why a bucket WORKDIR is staged locally and uploaded (sft_jax.workdir.bucket_mirror). Once
    this fails, Orbax writes arrays to S3 itself and the staging layer could give way to it."""
    monkeypatch.chdir(tmp_path)
    tree = {"w": np.arange(6, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"should be absolute\. Got s3:/sft-data"):  # OCDBT
        ocp.PyTreeCheckpointer().save(epath.Path(f"s3://{BUCKET}/ocdbt"), tree)
    with contextlib.suppress(FileNotFoundError):  # its metadata is in S3, its arrays are not
        ocp.PyTreeCheckpointer(use_ocdbt=False).save(epath.Path(f"s3://{BUCKET}/plain"), tree)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert not [key for key in keys if "/w/" in key], f"Orbax now writes arrays to S3: {keys}"
    assert list((tmp_path / "s3:" / BUCKET).rglob("w/.zarray")), "the arrays went elsewhere"


# --- A run whose WORKDIR is in the bucket -----------------------------------------------------

RUN = f"s3://{BUCKET}/run"


class StopAfter2(trainer.StopSignal):
    """A stop signal (as SIGTERM) after step 2: the run saves step 2 and ends."""

    checks = 0

    def agreed(self) -> bool:
        StopAfter2.checks += 1
        return StopAfter2.checks > 2


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Llama with a ChatML tokenizer, and chat data as a local file."""
    model_dir, data_dir = tmp_path_factory.mktemp("llama"), tmp_path_factory.mktemp("chat")
    save_tiny_llama(model_dir, make_tokenizer("chatml"))
    write_jsonl(data_dir / "train.jsonl", chat_rows(40, 0))
    return model_dir, data_dir


def run_config(chat_model, data: str, staging: Path):
    """4 steps of the tiny model on the stream loader, data from `data` (a folder or URL), a
    checkpoint every 2 steps of which the bucket keeps the last, exported. No eval: fewer
    seconds (the eval data path is the train data's)."""
    config = trainer_config(chat_model[0], steps=4, learning_rate=1e-3)
    config.data.update(loader="stream", stream_window=16, max_length=64, num_workers=1,
                       train_files=f"{data}/train.jsonl", eval_files="",
                       cache_dir=str(staging.parent / "cache"))  # fmt: skip
    config.eval.update(every_steps=0, at_start=False)
    config.checkpoint.update(enabled=True, every_steps=2, keep_last=1, keep_best=0,
                             staging_dir=str(staging))  # fmt: skip
    config.export.at_end = "last"
    return config


def bucket_keys(s3, prefix: str) -> dict[str, int]:
    found = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"].removeprefix(prefix): o["Size"] for o in found}


@pytest.mark.e2e
def test_a_run_in_s3_stops_and_resumes_from_the_bucket_bitwise(s3, chat_model, tmp_path):
    """Data and checkpoints round-trip through S3: a run stopped after step 2 resumes on a
    fresh machine (an empty staging directory) from the bucket, ignoring a half-uploaded step
    3, and logs the losses of an uninterrupted local run bitwise; the export lands in the
    bucket and reads back through `python -m sft_jax.export --workdir=s3://...`."""
    s3.upload_file(str(chat_model[1] / "train.jsonl"), BUCKET, "chat/train.jsonl")
    data = f"s3://{BUCKET}/chat"
    straight = tmp_path / "straight"
    reference = run_config(chat_model, str(chat_model[1]), tmp_path / "a")
    reference.export.at_end = "none"
    trainer.run(reference, straight, open_run_data)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "StopSignal", StopAfter2)
        first = trainer.run(run_config(chat_model, data, tmp_path / "a"), RUN, open_run_data)
    assert first["interrupted"] and first["end_step"] == 2
    steps = bucket_keys(s3, "run/checkpoints/")
    assert {key for key in steps if key.endswith(MARKER)} == {f"2/{MARKER}"}
    for key in [key for key in steps if key.startswith("2/")]:  # step 3, half uploaded
        s3.copy_object(Bucket=BUCKET, Key=f"run/checkpoints/3/{key[2:]}",
                       CopySource={"Bucket": BUCKET, "Key": f"run/checkpoints/{key}"})  # fmt: skip
        break
    resumed = trainer.run(run_config(chat_model, data, tmp_path / "b"), RUN, open_run_data)
    assert resumed["start_step"] == 2 and resumed["end_step"] == 4
    staged = staging_dir(RUN, str(tmp_path / "b"))
    assert train_losses(staged) == train_losses(straight) and len(train_losses(straight)) == 4
    in_bucket = bucket_keys(s3, "run/")  # step 4 kept (keep_last=1); 2 and the half 3 gone
    assert {k.split("/")[1] for k in in_bucket if k.startswith("checkpoints/")} == {"4"}
    assert f"checkpoints/4/{MARKER}" in in_bucket
    assert in_bucket["metrics.jsonl"] == (staged / "metrics.jsonl").stat().st_size
    assert {"export/config.json", "export/model.safetensors"} <= set(in_bucket)
    again = export_run(RUN, which=4, out=f"s3://{BUCKET}/again", staging_root=str(tmp_path / "c"))
    assert again == f"s3://{BUCKET}/again"
    exported = bucket_keys(s3, "again/")
    assert exported["model.safetensors"] == in_bucket["export/model.safetensors"]


def test_an_upload_that_fails_keeps_the_staged_step_and_names_it(s3, tmp_path, monkeypatch):
    """Credentials gone mid-run: the save of step 2 names the step and where it is; step 1 stays
    complete in the bucket, step 2 stays complete locally and goes up on the next start."""
    state = {"params": {"w": np.arange(8, dtype=np.float32)}, "step": np.int32(0)}
    mirror = BucketMirror.open(RUN, str(tmp_path), "--workdir")
    mirror.pull_run()  # as a run starts
    checkpoints = Checkpoints(mirror.checkpoints, keep_last=2, keep_best=0, on_saved=mirror.publish)
    checkpoints.save(1, state, {"position": 1}, train_config())
    checkpoints.wait()
    assert set(mirror.complete_steps(mirror.checkpoints)) == {1}
    without_credentials(monkeypatch)
    checkpoints.save(2, state, {"position": 2}, train_config())
    message = rf"step 2 was saved to {mirror.checkpoints}/2 but could not be uploaded .*{RUN}"
    with pytest.raises(CheckpointSaveError, match=message):
        checkpoints.close()
    assert committed_steps(mirror.checkpoints) == [1, 2]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    assert set(mirror.complete_steps(mirror.checkpoints)) == {1}
    BucketMirror.open(RUN, str(tmp_path), "--workdir").pull_run()
    assert set(mirror.complete_steps(mirror.checkpoints)) == {1, 2}
    # A bucket path with no run (never used, or deleted): an old staging copy is not resumed.
    fresh = BucketMirror.open(f"s3://{BUCKET}/fresh", str(tmp_path), "--workdir")
    (fresh.checkpoints / "7").mkdir(parents=True)
    fresh.pull_run()
    assert not fresh.checkpoints.exists() and RUN_FILE in bucket_keys(s3, "fresh/")


@pytest.mark.e2e
def test_a_missing_bucket_or_no_credentials_stop_a_bucket_run_before_it_starts(
    s3, chat_model, tmp_path, monkeypatch
):
    config = run_config(chat_model, str(chat_model[1]), tmp_path / "stage")
    no_data = lambda *_: pytest.fail("the run started")  # noqa: E731
    with pytest.raises(CloudError, match=r"^--workdir=s3://no-such-bucket/run: s3://no-such"):
        trainer.run(config, "s3://no-such-bucket/run", no_data)
    without_credentials(monkeypatch)
    with pytest.raises(CloudError, match=rf"^--workdir={RUN}: .*cannot list it.*AWS_ACCESS_KEY"):
        trainer.run(config, RUN, no_data)
    assert not (tmp_path / "stage").exists()
    config.checkpoint.staging_dir = f"s3://{BUCKET}/stage"
    with pytest.raises(ConfigError, match=r"^config\.checkpoint\.staging_dir='s3://"):
        config_check.check_values(RunSpec.of(config), device_count=1, batch_shards=1)
    with pytest.raises(ConfigError, match=r"^checkpoint directory=s3://sft-data/run/checkpoints"):
        Checkpoints("s3://sft-data/run/checkpoints")  # type: ignore[arg-type]


@pytest.mark.e2e
def test_train_with_a_missing_bucket_says_so_in_one_line(s3, tmp_path):
    root = Path(__file__).parents[2]
    command = [sys.executable, str(root / "main.py"), f"--config={root}/configs/base.py",
               "--workdir=s3://no-such-bucket/run",
               f"--config.checkpoint.staging_dir={tmp_path}/stage"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "error: --workdir=s3://no-such-bucket/run: s3://no-such-bucket/run: cannot" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def without_credentials(monkeypatch) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    for key in ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.setenv(key, "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no wait for an instance role
