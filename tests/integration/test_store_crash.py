"""Crash safety and concurrency of the store, with real processes: a killed import leaves nothing visible,
and two concurrent imports of one name both land."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import ROOT, cli, wait_for

from model_store import ModelStore

HOOKED = [sys.executable, str(ROOT / "tests" / "data" / "hooked_cli.py")]


def importer(home, source, name: str, pause_marker=None) -> subprocess.Popen[str]:
    command = cli("models", "import", name, str(source))
    if pause_marker is not None:  # block inside the staging step, announcing it in the marker file
        command = [*HOOKED, "pause-in-staging", str(pause_marker), "models", "import", name, str(source)]
    return subprocess.Popen(
        command,
        env={**os.environ, "DIFFUSERS_GRPC_HOME": str(home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def test_an_import_killed_mid_write_leaves_no_visible_model(store, tmp_path):
    home, marker = tmp_path / "home", tmp_path / "staging-marker"
    source = store.get("tiny-sd").path
    process = importer(home, source, "crashy", pause_marker=marker)
    try:  # the writer announces it is inside its staging step (a file is all another process can share)
        wait_for(lambda: marker.exists() or process.poll() is not None, what="the writer reaching staging")
        assert process.poll() is None, process.communicate()
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
