"""Shared fixtures: a tiny model built here, small data files, and one local Ray head for the session."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from leftovers import MARK, stop_leftovers  # noqa: E402
from tiny_model import build_tiny_model, write_chat_jsonl  # noqa: E402

# Every process the session starts inherits the mark (`make test` sets its own, to clean up after a crash too).
os.environ.setdefault(MARK, f"pytest-{os.getpid()}-{time.time_ns()}")


def pytest_sessionfinish(session, exitstatus):
    """Stop whatever the tests left running (a test that failed half-way may leave a head or a driver)."""
    stopped = stop_leftovers(os.environ[MARK])
    if stopped:
        print(f"\nstopped {stopped} process(es) the tests left running")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("data")
    return write_chat_jsonl(folder / "train.jsonl", 24), write_chat_jsonl(folder / "eval.jsonl", 6)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A local Ray head started the way a user's first create() starts it, with its own home; stopped at the end."""
    home = tmp_path_factory.mktemp("home")
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_FINETUNE_HOME"] = str(home)
    os.environ["RAY_FINETUNE_MAX_CONCURRENT_RUNS"] = "1"
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from ray_finetune import cluster as cluster_module

    settings = cluster_module.connect()
    yield settings
    cluster_module.down()


@pytest.fixture()
def s3(monkeypatch):
    """A real S3 server (moto's) on loopback with a bucket `training-data`; AWS_* point every client at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address
    endpoint = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(key, value)
    import boto3

    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()   # fsspec reuses a filesystem made for an earlier test's server
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="training-data")
    yield client
    server.stop()
