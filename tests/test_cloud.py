"""Data and checkpoints in S3: a real S3 API served locally by moto (server mode)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import test_stream
from test_data import conversation, write_jsonl

from sft_jax.data import open_run_data
from sft_jax.data.cloud import CloudError

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
