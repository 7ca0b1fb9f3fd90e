"""The OpenAI-compatible API's conversions: field types, validation's field names as this API's, errors as
HTTP statuses, partial-image steps, OpenAI's mask, and the HTTP flags' environment variables."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import batching
from service import imaging
from service.config import from_sources
from service.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from service.openai_api import (
    EDIT_FIELDS,
    GENERATION_FIELDS,
    Form,
    HttpError,
    form_loras,
    http_error,
    http_field,
    partial_steps,
)


@pytest.mark.parametrize(
    ("field", "renamed"),
    [
        ("params.height", "size"),
        ("params.width", "size"),
        ("params.num_images", "n"),
        ("params.quality", "output_compression"),
        ("params.num_inference_steps", "num_inference_steps"),
        ("params.guidance_scale", "guidance_scale"),
        ("params.true_cfg_scale", "true_cfg_scale"),
        ("params.adapters", "loras"),
        ("params.adapters[1].weight", "loras[1].weight"),
        ("mask_image", "mask"),
        ("images", "image"),
        ("images[0]", "image[0]"),
        ("prompt", "prompt"),
        ("strength", "strength"),
        ("params", None),
    ],
)
def test_validations_field_names_become_this_apis(field, renamed):
    assert http_field(field) == renamed


def test_form_values_are_typed_from_text_and_json_types_are_held_to():
    form = Form.of({"n": "2", "stream": "true", "guidance_scale": "7.5", "prompt": "x"}, EDIT_FIELDS, from_text=True)
    assert form.values == {"n": 2, "stream": True, "guidance_scale": 7.5, "prompt": "x"}
    assert Form.of({"n": 2.0, "user": "ignored", "seed": None}, GENERATION_FIELDS, from_text=False).values == {"n": 2}
    for raw, param in (
        ({"n": True}, "n"),
        ({"n": 1.5}, "n"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": 10**400}, "guidance_scale"),  # JSON integers are unbounded: a 400, never an overflow
        ({"num_inference_steps": -(10**400)}, "num_inference_steps"),
        ({"stream": "yes"}, "stream"),
        ({"prompt": 3}, "prompt"),
        ({"strength": 0.5}, "strength"),  # an edit's field, not a generation's
        ({"loras": [{"name": "a", "scale": 1}]}, "loras[0]"),
    ):
        with pytest.raises(HttpError) as caught:
            Form.of(raw, GENERATION_FIELDS, from_text=False)
        assert (caught.value.status, caught.value.param) == (400, param), raw


def test_the_openai_clients_form_encoding_of_loras_is_read_in_order():
    pairs = [("loras[][name]", "a"), ("loras[][weight]", "0.5"), ("loras[][name]", "b")]
    assert form_loras(pairs) == [{"name": "a", "weight": "0.5"}, {"name": "b"}]
    form = Form.of({"loras": form_loras(pairs)}, EDIT_FIELDS, from_text=True)
    assert form.get("loras") == (("a", 0.5), ("b", 1.0))
    assert Form.of({"loras": '[{"name": "c"}]'}, EDIT_FIELDS, from_text=True).get("loras") == (("c", 1.0),)


def test_errors_map_to_openai_statuses_params_and_retry_after():
    bad = http_error(InvalidArgument.of([FieldViolation("params.num_images", "must be between 1 and 4, got 9")]))
    assert (bad.status, bad.param, bad.code) == (400, "n", "invalid_argument") and "n: must be" in bad.message
    missing = http_error(NotFound("model x is not served here"))
    assert (missing.status, missing.param, missing.code) == (404, "model", "model_not_found")
    full = http_error(batching.QueueFullError("queue full"))
    assert (full.status, full.code, full.retry_after, full.kind) == (429, "queue_full", 1, "rate_limit_error")
    draining = http_error(Unavailable("shutting down"))
    assert (draining.status, draining.code, draining.retry_after) == (503, "draining", 1)
    bug = http_error(RuntimeError("a secret detail"))
    assert (bug.status, bug.code, bug.grpc_code) == (500, "internal", "INTERNAL") and "secret" not in bug.message
    assert set(bad.body()["error"]) == {"message", "type", "param", "code"}


def test_partial_images_are_spread_before_the_last_step():
    assert partial_steps(6, 2) == [2, 4]
    assert partial_steps(150, 3) == [38, 75, 112]
    assert partial_steps(2, 3) == [1]  # fewer steps than partial images: fewer partial images
    assert partial_steps(1, 1) == []


def test_openais_mask_becomes_diffusers_white_repaints_mask():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[:, 2:, 3] = 0  # transparent: repaint
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    mask = np.asarray(Image.open(io.BytesIO(imaging.mask_from_alpha(buffer.getvalue(), max_pixels=64))))
    assert (mask[:, 2:] == 255).all() and (mask[:, :2] == 0).all()
    opaque = io.BytesIO()
    Image.new("L", (4, 4)).save(opaque, format="PNG")
    with pytest.raises(imaging.ImageDecodeError, match="alpha"):
        imaging.mask_from_alpha(opaque.getvalue(), max_pixels=64)
    with pytest.raises(imaging.ImageDecodeError, match="limit"):
        imaging.mask_from_alpha(buffer.getvalue(), max_pixels=8)


def test_the_http_flags_read_their_environment_variables():
    config = from_sources({}, {"DIFFUSERS_GRPC_HTTP_PORT": "8080", "DIFFUSERS_GRPC_HTTP_HOST": "0.0.0.0"})
    assert (config.http_port, config.http_address) == (8080, "0.0.0.0")
    assert from_sources({}, {}).http_port is None  # off unless asked for
    assert from_sources({}, {"DIFFUSERS_GRPC_HOST": "[::]"}).http_address == "::"
