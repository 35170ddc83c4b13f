"""Data in S3, and why checkpoints are not: a real S3 API served locally by moto (server mode)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import test_stream
from etils import epath
from test_data import base_config, conversation, write_jsonl

from sft_jax import config_check, rundir
from sft_jax.checkpointing import Checkpoints, require_local
from sft_jax.data import open_run_data
from sft_jax.data.cloud import CloudError
from sft_jax.errors import ConfigError

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
    server.stop()


def test_training_data_is_read_from_s3_like_a_local_file(s3, stream_config, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [conversation(i) for i in range(24)])
    s3.upload_file(str(tmp_path / "train.jsonl"), BUCKET, "chat/train.jsonl")
    local = next(open_run_data(stream_config).train_batches)
    stream_config.data.train_files = f"s3://{BUCKET}/chat/*.jsonl"
    remote = next(open_run_data(stream_config).train_batches)
    for key, value in local.items():
        np.testing.assert_array_equal(remote[key], value)


def test_a_missing_bucket_or_missing_credentials_name_the_path(s3, stream_config, monkeypatch):
    stream_config.data.train_files = "s3://no-such-bucket/train.jsonl"
    with pytest.raises(CloudError, match=r"s3://no-such-bucket/train\.jsonl: cannot read it"):
        open_run_data(stream_config)
    s3.put_object(Bucket=BUCKET, Key="train.jsonl", Body=b"{}\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    stream_config.data.train_files = f"s3://{BUCKET}/train.jsonl"
    with pytest.raises(CloudError, match=rf"s3://{BUCKET}/train\.jsonl: .*AWS_ACCESS_KEY_ID"):
        open_run_data(stream_config)


def test_orbax_still_writes_s3_checkpoint_arrays_to_local_disk(s3, tmp_path, monkeypatch):
    """Why bucket WORKDIRs are refused (checkpointing.require_local). Once this fails, Orbax
    writes arrays to S3 itself: lift the guard and test a resume through the bucket."""
    monkeypatch.chdir(tmp_path)
    tree = {"w": np.arange(6, dtype=np.float32)}
    with pytest.raises(ValueError, match=r"should be absolute\. Got s3:/sft-data"):  # OCDBT
        ocp.PyTreeCheckpointer().save(epath.Path(f"s3://{BUCKET}/ocdbt"), tree)
    with contextlib.suppress(FileNotFoundError):  # its metadata is in S3, its arrays are not
        ocp.PyTreeCheckpointer(use_ocdbt=False).save(epath.Path(f"s3://{BUCKET}/plain"), tree)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert not [key for key in keys if "/w/" in key], f"Orbax now writes arrays to S3: {keys}"
    assert list((tmp_path / "s3:" / BUCKET).rglob("w/.zarray")), "the arrays went elsewhere"


def test_a_bucket_workdir_or_init_from_is_refused_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^--workdir=s3://sft-data/run: checkpoints cannot"):
        require_local("s3://sft-data/run", "--workdir")
    with pytest.raises(ConfigError, match=r"^config\.checkpoint\.init_from=gs://b/run: "):
        rundir.open_run("gs://b/run", "config.checkpoint.init_from")
    config = base_config()
    config.checkpoint.init_from = "s3://sft-data/run"
    with pytest.raises(ConfigError, match=r"^config\.checkpoint\.init_from='s3://sft-data/run'"):
        config_check.check_values(config, device_count=1, batch_shards=1)
    with pytest.raises(ConfigError, match=r"^checkpoint directory=s3://sft-data/run/checkpoints"):
        Checkpoints("s3://sft-data/run/checkpoints")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir()), "a local folder was made of the URL"


def test_train_with_a_bucket_workdir_stops_before_creating_anything(tmp_path):
    root = Path(__file__).parents[1]
    command = [sys.executable, str(root / "main.py"), f"--config={root}/configs/base.py",
               "--workdir=s3://sft-data/run"]  # fmt: skip
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "error: --workdir=s3://sft-data/run: checkpoints cannot" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())
