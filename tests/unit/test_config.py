"""Configuration: a flag wins over its environment variable, which wins over the default; bad values say why."""

from __future__ import annotations

import subprocess

import pytest
from helpers import cli

from service.config import ConfigError, ServerConfig, from_sources


def test_flag_beats_environment_beats_default():
    env = {"DIFFUSERS_GRPC_PORT": "6000", "DIFFUSERS_GRPC_MAX_BATCH_SIZE": "4", "DIFFUSERS_GRPC_TAGS": "a,b:v1"}
    config = from_sources({"port": 7000}, env)
    assert config.port == 7000  # flag
    assert config.max_batch_size == 4  # environment
    assert config.tags == ("a", "b:v1")
    assert config.max_queue == ServerConfig().max_queue  # default


def test_booleans_and_floats_parse_from_the_environment():
    config = from_sources({}, {"DIFFUSERS_GRPC_REFLECTION": "false", "DIFFUSERS_GRPC_GRACE_SECONDS": "2.5"})
    assert config.reflection is False and config.grace_seconds == 2.5


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({}, {"DIFFUSERS_GRPC_PORT": "many"}, "DIFFUSERS_GRPC_PORT: cannot parse 'many'"),
        ({"port": 70000}, {}, "port must be an integer between 0 and 65535, got 70000"),
        ({"max_batch_size": 0}, {}, "max_batch_size must be an integer >= 1, got 0"),
        ({"log_format": "xml"}, {}, "log_format must be 'text' or 'json', got 'xml'"),
        ({"tls_cert": "c.pem"}, {}, "tls_cert and tls_key must be given together"),
        ({"max_image_size": 100}, {}, "max_image_size must be a positive multiple of 8, got 100"),
    ],
)
def test_bad_values_are_refused_saying_what_was_given(flags, env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_sources(flags, env)


def test_serve_help_documents_every_flag_with_its_variable():
    text = subprocess.run(cli("serve", "--help"), capture_output=True, text=True, timeout=60).stdout
    for flag in (
        "--host",
        "--port",
        "--uds",
        "--device",
        "--max-batch-size",
        "--max-wait-ms",
        "--max-queue",
        "--metrics-port",
        "--store",
        "--max-message-mb",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--auth-token",
        "--grace-seconds",
        "--log-format",
        "--workers-per-device",
    ):
        assert flag in text
        assert "DIFFUSERS_GRPC_" + flag[2:].upper().replace("-", "_") in text


def test_serve_exits_2_with_a_clear_message_on_bad_config():
    result = subprocess.run(cli("serve", "--max-batch-size", "0"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "max_batch_size must be an integer >= 1, got 0" in result.stderr
