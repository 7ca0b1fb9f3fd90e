"""model_store.interface: the task of a signature comes from its pipeline's parameters, not its class name."""

from __future__ import annotations

import diffusers
import pytest

from model_store import interface
from model_store.interface import CUSTOM, EDIT, IMG2IMG, INPAINT, TEXT2IMG


@pytest.mark.parametrize(
    ("pipeline", "task"),
    [
        ("StableDiffusionPipeline", TEXT2IMG),
        ("StableDiffusionImg2ImgPipeline", IMG2IMG),
        ("StableDiffusionInpaintPipeline", INPAINT),
        ("StableDiffusionXLPipeline", TEXT2IMG),
        ("StableDiffusionXLImg2ImgPipeline", IMG2IMG),
        ("StableDiffusionControlNetPipeline", TEXT2IMG),  # its `image` is the ControlNet's conditioning
        ("StableDiffusionControlNetInpaintPipeline", INPAINT),
        ("StableDiffusion3Pipeline", TEXT2IMG),
        ("FluxPipeline", TEXT2IMG),
        ("DDPMPipeline", CUSTOM),  # unconditional: no prompt
        ("StableDiffusionInstructPix2PixPipeline", EDIT),  # an image but no strength: editing, not img2img
        ("FluxKontextPipeline", EDIT),
        ("QwenImageEditPipeline", EDIT),
        ("QwenImageEditPlusPipeline", EDIT),
        ("StableDiffusionUpscalePipeline", CUSTOM),  # an image and a prompt, but a noise level: an upscaler
        ("PaintByExamplePipeline", CUSTOM),  # a mask, but an example image instead of a prompt
        ("TextToVideoSDPipeline", CUSTOM),  # frames, not images
        ("AudioLDMPipeline", CUSTOM),
    ],
)
def test_the_task_of_a_call_comes_from_its_parameters(pipeline, task):
    assert interface.call_task(getattr(diffusers, pipeline)) == task


@pytest.mark.parametrize(
    ("pipeline", "task", "derived"),
    [
        ("StableDiffusionPipeline", IMG2IMG, "StableDiffusionImg2ImgPipeline"),
        ("StableDiffusionXLPipeline", INPAINT, "StableDiffusionXLInpaintPipeline"),
        ("StableDiffusionControlNetPipeline", IMG2IMG, "StableDiffusionControlNetImg2ImgPipeline"),
        ("StableDiffusionImg2ImgPipeline", TEXT2IMG, "StableDiffusionPipeline"),
        ("StableDiffusionPipeline", TEXT2IMG, "StableDiffusionPipeline"),
        ("DDPMPipeline", IMG2IMG, None),
        ("StableDiffusionPipeline", CUSTOM, None),
    ],
)
def test_the_class_serving_a_derived_task(pipeline, task, derived):
    found = interface.derived_class(getattr(diffusers, pipeline), task)
    assert (found.__name__ if found else None) == derived


def test_a_subclass_derives_through_its_diffusers_base():
    class Styled(diffusers.StableDiffusionPipeline):
        pass

    assert interface.derived_class(Styled, INPAINT) is diffusers.StableDiffusionInpaintPipeline


def test_signature_parameters_and_the_models_defaults():
    sdxl = interface.signature_parameters(diffusers.StableDiffusionXLPipeline, "img2img", IMG2IMG)
    assert sdxl is not None and {"prompt_2", "strength", "aesthetic_score"} <= set(sdxl)
    assert "callback_on_step_end" in sdxl and "kwargs" not in sdxl
    sd = interface.signature_parameters(diffusers.StableDiffusionPipeline, "__call__", TEXT2IMG)
    assert interface.default_of(sd, "guidance_scale", None) == 7.5
    assert interface.default_of(sdxl, "guidance_scale", None) == 5.0
    assert interface.default_of(sd, "no_such_argument", 3) == 3


def test_custom_code_forwarding_keywords_takes_anything():
    class Forwarding(diffusers.StableDiffusionPipeline):
        def styled(self, prompt=None, **kwargs):
            return self(prompt=prompt, **kwargs)

    assert interface.signature_parameters(Forwarding, "styled", CUSTOM) is None
    assert interface.method_task(Forwarding, "img2img") == IMG2IMG  # a method named after a task performs it


def test_stored_tasks_of_the_first_format_are_read_in_todays_words():
    assert interface.normalize_task("other") == CUSTOM
    with pytest.raises(ValueError, match="unknown task"):
        interface.normalize_task("upscale")
