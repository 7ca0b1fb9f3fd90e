"""Tag grammar and version generation."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from model_store import InvalidTagError, Tag
from model_store.tags import new_version


@pytest.mark.parametrize(
    ("text", "name", "version"),
    [
        ("tiny-sd", "tiny-sd", None),
        ("tiny-sd:latest", "tiny-sd", None),
        ("sd2.1:v1_2", "sd2.1", "v1_2"),
        ("a", "a", None),
    ],
)
def test_valid_tags_parse(text, name, version):
    assert Tag.parse(text) == Tag(name, version)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("../x", "invalid"),
        ("A:B", "invalid"),
        ("x:", "empty"),
        ("x" * 64, "64 characters"),
        ("-x", "invalid"),
        ("x-", "invalid"),
        ("a/b", "invalid"),
        ("x:y:z", "invalid"),
    ],
)
def test_invalid_tags_are_refused_with_a_reason(text, why):
    with pytest.raises(InvalidTagError, match=why):
        Tag.parse(text)


def test_versions_are_valid_unique_and_sort_by_time():
    now = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)
    versions = [new_version(now + timedelta(microseconds=i)) for i in range(50)]
    assert versions == sorted(versions)
    assert len(set(versions)) == 50
    for version in versions:
        assert Tag.parse(f"m:{version}").version == version
    assert new_version(now) != new_version(now)  # same instant: the random suffix keeps them distinct
