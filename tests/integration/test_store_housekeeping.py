"""The store as the server and the importers keep it: served files are checked against their sha256 before any
load, what crashed writers left in .tmp goes at the next import or serve, and a store that disappears under a
running server turns readiness off."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import READINESS, health_status, wait_for
from inprocess import running_server

from model_store import IntegrityError, ModelStore
from service import server as server_module

SERVING, NOT_SERVING = 1, 2


@pytest.fixture
def copy(tmp_path, store):
    """A store of its own holding a copy of the demo model."""
    models = ModelStore(tmp_path / "store")
    models.import_model("tiny-sd", store.get("tiny-sd").path, signatures={"__call__": {"batchable": True}})
    return models


def test_a_model_whose_files_changed_is_not_served(copy):
    unet = next(copy.get("tiny-sd").path.glob("unet/*.safetensors"))
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF  # the same size: only the hash tells
    unet.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match its sha256"), running_server(copy, tags=("tiny-sd",)):
        pass


HOLD_STAGING = textwrap.dedent(
    """
    import sys
    from model_store import ModelStore
    folder = ModelStore(sys.argv[1]).staging_folder("import")
    (folder / "weights.bin").write_bytes(b"x" * 1024)
    print(folder, flush=True)
    sys.stdin.read()  # a writer still at work: it holds the folder until it is killed
    """
)


def _writer(home) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_STAGING, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    return process, process.stdout.readline().strip()  # type: ignore[union-attr]


def test_staging_left_by_a_crashed_import_goes_at_the_next_import_but_a_live_ones_stays(copy):
    crashed, crashed_folder = _writer(copy.home)
    live, live_folder = _writer(copy.home)
    try:
        crashed.send_signal(signal.SIGKILL)  # an import killed mid-write: no cleanup of its own ran
        crashed.wait(timeout=60)
        assert os.path.isdir(crashed_folder)
        copy.import_model("again", copy.get("tiny-sd").path, signatures={"__call__": {"batchable": True}})
        assert not os.path.exists(crashed_folder) and not os.path.exists(crashed_folder + ".owner")
        assert os.path.isdir(live_folder)  # its writer still holds it
    finally:
        live.kill()
        live.wait(timeout=60)
    assert copy.sweep_staging() == 1  # `serve` sweeps the same way, once the writer has gone
    assert not os.path.exists(live_folder)
    assert [p.name for p in (copy.home / ".tmp").iterdir()] == []


def test_a_store_removed_under_a_running_server_turns_readiness_off_and_back(copy, monkeypatch, caplog):
    monkeypatch.setattr(server_module, "ADAPTER_REFRESH_SECONDS", 0.1)
    caplog.set_level(logging.ERROR, logger="service.server")
    with running_server(copy, tags=("tiny-sd",)) as (_, target):
        assert health_status(target, READINESS) == SERVING
        moved = copy.home.with_name("moved")
        shutil.move(copy.models_dir, moved)
        wait_for(lambda: health_status(target, READINESS) == NOT_SERVING, what="readiness off")
        assert any("no longer holds tiny-sd" in r.getMessage() for r in caplog.records)
        shutil.move(moved, copy.models_dir)
        wait_for(lambda: health_status(target, READINESS) == SERVING, what="readiness back")
