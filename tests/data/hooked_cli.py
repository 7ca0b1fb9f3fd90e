"""Runs the diffusers-grpc CLI with one test hook patched in from outside: production code carries no hooks.

python tests/data/hooked_cli.py pause-in-staging MARKER models import NAME SOURCE
    announces the staging folder in MARKER once it is filled, then blocks (so a test can SIGKILL the writer)
python tests/data/hooked_cli.py gate-load FIFO serve TAG ...
    every model load waits until the test writes to the named pipe FIFO (a slow load, on the test's cue)
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any


def pause_in_staging(marker: str) -> None:
    import model_store.store as store

    def announce_and_block(root: Path) -> list[str]:  # called right after the staging folder is filled
        Path(marker).write_text(str(root))
        threading.Event().wait()  # forever: the test kills us here
        return []

    store.list_files = announce_and_block  # type: ignore[assignment]


def gate_load(fifo: str) -> None:
    from model_store.model import Model

    real = Model.load_pipeline

    def gated(self: Model, *args: Any, **kwargs: Any) -> Any:
        with open(fifo) as cue:  # blocks until the test opens the pipe for writing
            cue.read()
        return real(self, *args, **kwargs)

    Model.load_pipeline = gated  # type: ignore[method-assign]


if __name__ == "__main__":
    hook, argument, *cli_args = sys.argv[1:]
    {"pause-in-staging": pause_in_staging, "gate-load": gate_load}[hook](argument)
    from service.cli import main

    sys.exit(main(cli_args))
