"""Session fixtures: one tiny demo model in a temporary store, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test folder


@pytest.fixture(scope="session")
def store_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the demo model `tiny-sd` (f8 shape, random weights), shared by the session."""
    from model_store import ModelStore
    from model_store.demo import save_demo

    home = tmp_path_factory.mktemp("store")
    save_demo(ModelStore(home))
    return home


@pytest.fixture(scope="session")
def store(store_home: Path):
    from model_store import ModelStore

    return ModelStore(store_home)


@pytest.fixture
def home_env(store_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $DIFFUSERS_GRPC_HOME at the session store for code that uses the default store."""
    monkeypatch.setenv("DIFFUSERS_GRPC_HOME", str(store_home))
    return store_home


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may touch the hub


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API server on loopback, with the standard AWS variables pointing at it; yields the endpoint."""
    from helpers import free_port
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket on the moto server."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name
