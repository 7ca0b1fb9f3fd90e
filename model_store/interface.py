"""What a pipeline's interface says: the one place that answers, for any pipeline class,
- which parameters a signature (a method, or a task derived with `from_pipe`) takes;
- which task it performs (text2img, img2img, inpaint, or custom), judged by those parameters, not the class name;
- which pipeline class serves a derived task.

Only public diffusers APIs: `inspect.signature`, the auto-pipeline mappings behind `AutoPipelineFor*`, and
`DiffusionPipeline.from_pipe`. The model store, the service's validation and the pipeline engines all ask here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

TEXT2IMG, IMG2IMG, INPAINT, EDIT, CUSTOM = "text2img", "img2img", "inpaint", "edit", "custom"
TYPED_TASKS = (TEXT2IMG, IMG2IMG, INPAINT, EDIT)  # the tasks of the typed RPCs; anything else runs through Call
DERIVABLE_TASKS = (TEXT2IMG, IMG2IMG, INPAINT)  # the tasks diffusers' auto pipelines derive with from_pipe
# Editing pipelines made for several reference images in one `image` list (the others take one).
SEVERAL_IMAGES = frozenset({"QwenImageEditPlusPipeline", "Flux2Pipeline", "Flux2KleinPipeline"})
# Parameters that make an image-and-prompt pipeline something other than an editor: an upscaler's noise level.
_NOT_EDITING = ("noise_level",)
ALL_TASKS = (*TYPED_TASKS, CUSTOM)
_LEGACY_TASKS = {"other": CUSTOM}  # what model.yaml files of format 1 called a custom signature

Parameters = Mapping[str, inspect.Parameter]


def normalize_task(task: str) -> str:
    """A task name as stored or declared, in today's vocabulary."""
    task = _LEGACY_TASKS.get(task, task)
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; the tasks are {', '.join(ALL_TASKS)}")
    return task


def parameters(function: Callable[..., Any]) -> Parameters:
    """The named keyword parameters of a callable (no self, no *args, no **kwargs)."""
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p for name, p in params.items() if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def takes_any_keyword(function: Callable[..., Any]) -> bool:
    """Whether a callable takes `**kwargs`."""
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False


def accepts(function: Callable[..., Any], name: str) -> bool:
    """Whether a call may pass `name=...` to this callable."""
    return name in parameters(function) or takes_any_keyword(function)


def task_of_parameters(names: Mapping[str, Any] | frozenset[str], has_controlnet: bool) -> str:
    """The typed task a call with these parameters performs.

    Every typed task takes a prompt and makes still images (no `num_frames`). A mask makes inpainting; an input
    image with a strength makes image-to-image; a size and no input image makes text-to-image, and so does an
    image that is a ControlNet's conditioning (ControlNet text-to-image pipelines call it `image`); an input
    image with no strength (and no upscaler's noise level) makes instruction editing (FLUX Kontext,
    Qwen-Image-Edit, InstructPix2Pix). Anything else (unconditional, audio, video, variations, upscalers) is
    custom, served through Call.
    """
    if "prompt" not in names or "num_frames" in names:
        return CUSTOM
    if "mask_image" in names and "image" in names:
        return INPAINT
    if "image" in names and "strength" in names:
        return IMG2IMG
    if "height" in names and "width" in names and ("image" not in names or has_controlnet):
        return TEXT2IMG
    if "image" in names and not has_controlnet and not any(name in names for name in _NOT_EDITING):
        return EDIT
    return CUSTOM


def call_task(cls: type) -> str:
    """The task a pipeline class's `__call__` performs."""
    return task_of_parameters(frozenset(parameters(cls.__call__)), has_controlnet(cls))


def has_controlnet(cls: type) -> bool:
    """Whether a pipeline class takes a ControlNet among its components."""
    init: Callable[..., Any] = getattr(cls, "__init__")  # noqa: B009 (the class's own, not an instance's)
    return "controlnet" in parameters(init)


def method_task(cls: type, method: str) -> str:
    """The task a signature performs: a method named after a task performs it (the author's declaration);
    `__call__` and other methods are judged by their parameters."""
    if method in TYPED_TASKS:
        return method
    function = getattr(cls, method, None)
    if function is None:
        return CUSTOM
    if method == "__call__":
        return call_task(cls)
    return task_of_parameters(frozenset(parameters(function)), has_controlnet(cls))


@functools.lru_cache(maxsize=256)
def derived_class(cls: type, task: str) -> type | None:
    """The diffusers pipeline class that performs `task` with the components of `cls` (`from_pipe`), or None.

    Found through the mappings behind `AutoPipelineForText2Image/Image2Image/Inpainting`: the family of `cls`
    (or of its nearest diffusers base class), then that family's class for the task.
    """
    if task not in TYPED_TASKS:
        return None
    if call_task(cls) == task:
        return cls
    if task not in DERIVABLE_TASKS:  # no auto pipeline derives an editor
        return None
    from diffusers.pipelines import auto_pipeline

    by_task = {
        TEXT2IMG: auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        IMG2IMG: auto_pipeline.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
        INPAINT: auto_pipeline.AUTO_INPAINT_PIPELINES_MAPPING,
    }
    mappings: list[Mapping[str, type]] = list(auto_pipeline.SUPPORTED_TASKS_MAPPINGS)  # type: ignore[arg-type]
    for klass in cls.__mro__:
        for mapping in mappings:
            family = next((name for name, known in mapping.items() if known.__name__ == klass.__name__), None)
            if family is not None:
                found: type | None = by_task[task].get(family)
                return found
    return None


def derive(pipeline: Any, task: str) -> Any:
    """A pipeline performing `task` that shares `pipeline`'s modules (the pipeline itself when it already does)."""
    target = derived_class(type(pipeline), task)  # type: ignore[arg-type]
    if target is None:
        raise ValueError(f"{type(pipeline).__name__} has no derived pipeline for {task}")
    if target is type(pipeline):
        return pipeline
    # Without dtype=..., from_pipe casts the shared modules (the original pipeline's too) to float32.
    with _without_empty_fp32_warning():
        derived = target.from_pipe(pipeline, dtype=pipeline.dtype)  # type: ignore[attr-defined]
    derived.set_progress_bar_config(disable=True)
    return derived


class _EmptyFp32Warning(logging.Filter):
    """diffusers 0.42's `ModelMixin.to(dtype=...)` warns that modules "should be kept in float32: []" for every
    model, an empty list included; from_pipe's no-op cast to the pipeline's own dtype says it once per module."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextlib.contextmanager
def _without_empty_fp32_warning() -> Iterator[None]:
    logger = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _EmptyFp32Warning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def signature_parameters(cls: type, method: str, task: str) -> Parameters | None:
    """What a signature takes: its method's named parameters, or those of the class that serves its derived
    task. None when the callable forwards arbitrary keywords (custom code): then the pipeline judges."""
    function = getattr(cls, method, None)
    if function is None:
        target = derived_class(cls, task)
        if target is None:
            return None
        function = target.__call__
    if takes_any_keyword(function) and not getattr(function, "__module__", "").startswith("diffusers."):
        return None  # custom code that forwards **kwargs
    # diffusers' own `**kwargs` only catch deprecated callbacks, never a client's arguments.
    return parameters(function)


def default_of(params: Parameters | None, name: str, fallback: Any) -> Any:
    """A parameter's default in the pipeline's own signature (the model's default), else `fallback`."""
    if params is None or name not in params:
        return fallback
    default = params[name].default
    return fallback if default is inspect.Parameter.empty or default is None else default
