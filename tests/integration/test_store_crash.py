"""Crash safety and concurrency of the store, with real processes: a killed import leaves nothing visible,
and two concurrent imports of one name both land."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from helpers import ROOT, cli

from model_store import ModelStore


def importer(home, source, name: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli("models", "import", name, str(source)),
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_an_import_killed_mid_write_leaves_no_visible_model(store, tmp_path):
    home, marker = tmp_path / "home", tmp_path / "staging-marker"
    source = store.get("tiny-sd").path
    process = importer(home, source, "crashy", DIFFUSERS_GRPC_TEST_PAUSE_IN_STAGING=str(marker))
    try:
        while not marker.exists():  # poll until the writer announces it is inside its staging step
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    staging = marker.read_text()
    assert staging.startswith(str(home / ".tmp"))  # the half-written copy exists, but only in staging
    local = ModelStore(home)
    assert local.list_models() == []
    assert not (home / "models" / "crashy").exists()
    done = importer(home, source, "crashy")
    assert done.wait(120) == 0, done.communicate()
    (model,) = local.list_models()
    model.check_files(full=True)
    assert local.get("crashy").tag == model.tag


def test_two_processes_importing_one_name_both_land(store, tmp_path):
    home = tmp_path / "home"
    source = store.get("tiny-sd").path
    processes = [importer(home, source, "twin") for _ in range(2)]
    results = [(p.wait(120), p.communicate()) for p in processes]
    assert [code for code, _ in results] == [0, 0], results
    local = ModelStore(home)
    versions = [m.version for m in local.list_models("twin")]
    assert len(versions) == 2 and len(set(versions)) == 2
    assert local.get("twin").version == max(versions)  # `latest` names the newest
    for model in local.list_models():
        model.check_files(full=True)
