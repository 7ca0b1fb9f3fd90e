"""Model tags: `name[:version]`, validated, with generated versions that sort by creation time."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from .errors import InvalidTagError

_PART = re.compile(r"[a-z0-9]([-._a-z0-9]*[a-z0-9])?")
MAX_PART_LENGTH = 63
LATEST = "latest"


def validate_part(value: str, what: str) -> str:
    """Return `value` if it is a valid name or version, else raise InvalidTagError saying why (quoting at most
    the first characters of it: a tag may come from a client)."""
    if not value:
        raise InvalidTagError(f"{what} is empty")
    if len(value) > MAX_PART_LENGTH:
        length = len(value)
        raise InvalidTagError(f"{what} {shown(value)} is {length} characters long; the maximum is {MAX_PART_LENGTH}")
    if not _PART.fullmatch(value):
        raise InvalidTagError(
            f"{what} {shown(value)} is invalid: use lowercase letters, digits and '-', '.', '_' inside, "
            "starting and ending with a letter or digit"
        )
    return value


def shown(text: str, limit: int = MAX_PART_LENGTH + 1) -> str:
    """A string for a message: quoted, control characters escaped (repr), and cut after `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class Tag:
    """A parsed tag. `version` None means the newest version (`latest`)."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Tag:
        if not isinstance(text, str):
            raise InvalidTagError(f"tag must be a string, got {type(text).__name__}")
        if len(text) > 2 * MAX_PART_LENGTH + 1:
            raise InvalidTagError(f"tag {shown(text)} is {len(text)} characters long; a tag is name[:version]")
        name, sep, version = text.partition(":")
        validate_part(name, "model name")
        if not sep:
            return cls(name)
        if version == LATEST:
            return cls(name)
        validate_part(version, "model version")
        return cls(name, version)

    def __str__(self) -> str:
        return f"{self.name}:{self.version or LATEST}"


def new_version(now: datetime | None = None) -> str:
    """A unique version that sorts by creation time: UTC timestamp to the microsecond plus a random suffix."""
    now = now or datetime.now(timezone.utc)
    return now.strftime("%Y%m%d-%H%M%S-%f") + "-" + secrets.token_hex(2)
