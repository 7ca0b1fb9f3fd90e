"""A real in-process server on the demo store, one per test module, and a client of it. A module that needs
another configuration defines its own `served`; `client` then connects to that one."""

from __future__ import annotations

import pytest
from inprocess import running_server

from service.client import DiffusionClient


@pytest.fixture(scope="module")
def served(store):
    with running_server(store, max_batch_size=8) as (server, target):
        yield server, target


@pytest.fixture(scope="module")
def client(served):
    with DiffusionClient(served[1]) as c:
        yield c
