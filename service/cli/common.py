"""Helpers shared by the CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any


class CliError(Exception):
    """A user-facing error: printed without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
