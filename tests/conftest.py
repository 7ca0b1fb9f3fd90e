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
    from model_store.demo import build_tiny_pipeline
    from service.cli.models_cmd import DEMO_NAME, DEMO_SIGNATURES

    home = tmp_path_factory.mktemp("store")
    ModelStore(home).save_model(DEMO_NAME, build_tiny_pipeline(seed=0), signatures=DEMO_SIGNATURES)
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
