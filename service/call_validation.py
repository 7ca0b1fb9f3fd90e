"""Validation of a Call: a declared signature by name, its keyword arguments checked against the method's own
parameters and held to the server's limits like the typed RPCs (sizes, steps, images, the pixel-steps budget,
text length, the reply's size), its Struct arguments finite and of sane depth."""

from __future__ import annotations

import inspect
import math
import re
import secrets
from typing import Any

from model_store.tags import shown

from .domain import CallRequest
from .errors import Unimplemented
from .generation import CallJob, images_asked
from .registry import ModelRegistry, ServedModel
from .validation import FALLBACK_STEPS, Limits, Violations, decoded_image, mime_type_of

# Set by the server from the request's seed and stream: a Call may not pass them.
RESERVED_CALL_ARGUMENTS = ("generator", "callback_on_step_end", "callback", "return_dict")
MAX_ARGUMENT_DEPTH = 16  # lists and objects inside arguments: deeper is no pipeline's argument
# Arguments diffusers pipelines take for the work a call does: held to the server's limits.
COUNTS = ("num_images_per_prompt", "batch_size")
FRAMES = "num_frames"
MAX_LIST_ITEMS = 1024  # a list argument (prompts are held to --max-images before this)
MAX_OBJECT_KEYS = 32  # an object argument
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
CROSS_ATTENTION_KEYS = frozenset({"scale"})  # what diffusers' own attention processors read
# Annotations naming a type JSON cannot carry: a client's value for such a parameter can only be wrong.
_NOT_JSON = {"Tensor", "ndarray", "Generator", "Callable", "Image", "PipelineImageInput", "FloatTensor"}


def call_job(request: CallRequest, registry: ModelRegistry, limits: Limits) -> CallJob:
    served = registry.resolve(request.model)
    signatures = served.model.signatures
    if request.signature not in signatures:
        names = ", ".join(sorted(signatures))
        raise Unimplemented(
            f"model {served.tag} has no signature {shown(request.signature)}; its signatures: {names}",
            metadata={"model": served.tag, "signature": request.signature},
            reason="SIGNATURE_NOT_FOUND",
        )
    signature = signatures[request.signature]
    parameters = served.parameters.get(signature.name)
    bad = Violations()
    checked = {}
    for name, value in request.arguments.items():
        field = f"arguments.{shown(name, 40)[1:-1]}"
        if name in RESERVED_CALL_ARGUMENTS:
            bad.add(field, "is set by the server (use `seed` for the generator)")
            continue
        if parameters is not None and name not in parameters:
            bad.add(field, f"{signature.name} has no argument {shown(name)}")
            continue
        if not _json_ok(value, field, limits, bad):
            continue
        try:
            checked[name] = coerce(value, parameters.get(name) if parameters else None)
        except TypeError as exc:
            bad.add(field, str(exc))
    images = {}
    for name, data in request.images.items():
        field = f"images[{shown(name, 40)[1:-1]}]"
        if parameters is not None and name not in parameters:
            bad.add(field, f"{signature.name} has no argument {shown(name)}")
            continue
        if name in checked:
            bad.add(field, f"{shown(name)} is also given in arguments")
            continue
        decoded = decoded_image(data, field, limits, bad)
        if decoded is not None:
            images[name] = decoded
    _check_work(checked, served, signature.name, limits, bad)
    mime_type = mime_type_of(request.output_format, "output_format", bad)
    bad.raise_if_any()
    return CallJob(
        served=served,
        signature=signature,
        arguments=checked,
        images=images,
        seed=request.seed if request.seed is not None else secrets.randbits(63),
        mime_type=mime_type,
        animated_webp=request.animated_webp,
    )


def _json_ok(value: Any, field: str, limits: Limits, bad: Violations, depth: int = 0) -> bool:
    """Finite numbers, texts within the limit, nesting within MAX_ARGUMENT_DEPTH, lists and objects of bounded
    size with short plain keys: nothing a client sends can grow a log line (diffusers quotes unknown keys of
    `cross_attention_kwargs` in a warning on every attention call) or the work past what its size says."""
    if depth > MAX_ARGUMENT_DEPTH:
        bad.add(field, f"nests lists and objects deeper than {MAX_ARGUMENT_DEPTH} levels")
        return False
    if isinstance(value, float) and not math.isfinite(value):
        bad.add(field, f"must be a finite number, got {value}")
        return False
    if isinstance(value, str) and len(value) > limits.max_prompt_chars:
        bad.add(field, f"is {len(value)} characters long; the server's limit is {limits.max_prompt_chars}")
        return False
    if isinstance(value, list):
        if len(value) > MAX_LIST_ITEMS:
            bad.add(field, f"is a list of {len(value)} values; at most {MAX_LIST_ITEMS}")
            return False
        return all(_json_ok(v, field, limits, bad, depth + 1) for v in value)
    if isinstance(value, dict):
        if len(value) > MAX_OBJECT_KEYS:
            bad.add(field, f"is an object of {len(value)} keys; at most {MAX_OBJECT_KEYS}")
            return False
        for key in value:
            if not _KEY.fullmatch(key):
                bad.add(field, f"has a key {shown(key, 40)}; keys are names of at most 64 letters, digits and _")
                return False
        return all(_json_ok(v, f"{field}.{k}", limits, bad, depth + 1) for k, v in value.items())
    return True


def _check_dict_arguments(arguments: dict[str, Any], bad: Violations) -> None:
    """Arguments whose keys reach diffusers' code paths: only keys it acts on."""
    extra = arguments.get("cross_attention_kwargs")
    if isinstance(extra, dict):
        unknown = sorted(set(extra) - CROSS_ATTENTION_KEYS)
        if unknown:
            bad.add(
                "arguments.cross_attention_kwargs",
                f"takes only {', '.join(sorted(CROSS_ATTENTION_KEYS))} (the LoRA scale); got {shown(unknown[0], 40)}",
            )


def _check_work(
    arguments: dict[str, Any], served: ServedModel, signature: str, limits: Limits, bad: Violations
) -> None:
    """The limits the typed RPCs apply, for the arguments of a call that ask for work: size, steps, counts."""
    ints = {name: value for name, value in arguments.items() if isinstance(value, int) and not isinstance(value, bool)}
    for name in ("height", "width"):
        if name in ints and not 8 <= ints[name] <= limits.max_image_size:
            bad.add(f"arguments.{name}", f"must be between 8 and {limits.max_image_size}, got {ints[name]}")
    if "num_inference_steps" in ints and not 1 <= ints["num_inference_steps"] <= limits.max_steps:
        bad.add(
            "arguments.num_inference_steps",
            f"must be between 1 and {limits.max_steps}, got {ints['num_inference_steps']}",
        )
    for name in COUNTS:
        if name in ints and not 1 <= ints[name] <= limits.max_images:
            bad.add(f"arguments.{name}", f"must be between 1 and {limits.max_images}, got {ints[name]}")
    if FRAMES in ints and ints[FRAMES] < 1:
        bad.add(f"arguments.{FRAMES}", f"must be at least 1, got {ints[FRAMES]}")
    _check_dict_arguments(arguments, bad)
    if bad.items:
        return
    images, field = images_asked(arguments)
    if images > limits.max_images:
        bad.add(
            f"arguments.{field}",
            f"asks for {images} images in one call; the server's limit is {limits.max_images} (--max-images)",
        )
        return
    height = ints.get("height", served.defaults.height)
    width = ints.get("width", served.defaults.width)
    steps = ints.get("num_inference_steps", served.default(signature, "num_inference_steps", FALLBACK_STEPS))
    limits.check_budget(images * ints.get(FRAMES, 1), height, width, steps, "arguments", bad)


def coerce(value: Any, parameter: inspect.Parameter | None) -> Any:
    """Check a Struct value against a method parameter; integral numbers become ints where only ints are expected.

    Struct numbers are all doubles, so `4.0` for `num_inference_steps: int` is accepted as 4, while `1e308` for a
    float parameter stays a float; a string where a number is expected is refused. A parameter whose type JSON
    cannot carry (a tensor, a generator) refuses any value; one with no usable annotation or default accepts any.
    """
    if parameter is not None and value is not None and _takes_no_json(parameter):
        raise TypeError("takes a tensor, image or object a Call's JSON arguments cannot carry (images go in `images`)")
    expected = _expected_types(parameter)
    if not expected or value is None:
        return value
    if isinstance(value, bool):
        if bool in expected:
            return value
    elif isinstance(value, float):
        if int in expected and value.is_integer() and float not in expected:
            return int(value)
        if float in expected:
            return value
    elif isinstance(value, list) and tuple in expected and list not in expected:
        # JSON has no tuple (SDXL's sizes are tuple[int, int]) and Struct numbers are doubles.
        return tuple(int(v) if isinstance(v, float) and v.is_integer() else v for v in value)
    elif isinstance(value, list) and list in expected:
        # A list of ints (DiT's `class_labels: list[int]`): its integral numbers become ints, as they must to
        # index an embedding; where floats are allowed too, numbers stay as sent.
        words = _words(parameter) if parameter is not None else set()
        if "int" in words and "float" not in words:
            return [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
        return value
    elif type(value) in expected:
        return value
    wanted = " or ".join(sorted(t.__name__ for t in expected))
    raise TypeError(f"must be {wanted}, got {type(value).__name__}")


_TYPE_WORDS = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "list": list,
    "List": list,
    "tuple": tuple,
    "Tuple": tuple,
    "dict": dict,
    "Dict": dict,
}


def _words(parameter: inspect.Parameter) -> set[str]:
    annotation = parameter.annotation
    if isinstance(annotation, str) or getattr(annotation, "__args__", None):  # list[int]'s __name__ is "list"
        text = str(annotation)
    else:
        text = getattr(annotation, "__name__", None) or str(annotation)
    return set(re.findall(r"\w+", text))  # the names in an annotation such as "int | list[str] | None"


def _takes_no_json(parameter: inspect.Parameter) -> bool:
    """Tensors, images, generators: a parameter annotated only with such types (and containers of them)."""
    if parameter.annotation is inspect.Parameter.empty:
        return False
    words = _words(parameter)
    plain = {word for word, kind in _TYPE_WORDS.items() if kind in (int, float, str, bool)}
    return bool(words & _NOT_JSON) and not words & (plain | {"Any", "Dict", "dict"})


def _expected_types(parameter: inspect.Parameter | None) -> set[type]:
    """Types a JSON value may have for this parameter; empty when it cannot be told (anything goes)."""
    if parameter is None:
        return set()
    if parameter.annotation is inspect.Parameter.empty:
        kind = type(parameter.default)
        return {kind} if kind in (int, float, str, bool) else set()
    words = _words(parameter)
    if words & ({"Any", "object"} | _NOT_JSON) and not words & {"Dict", "dict"}:
        return set()
    types = {t for w, t in _TYPE_WORDS.items() if w in words}
    if float in types:
        types.add(int)  # a float parameter takes integral numbers too
    return types
