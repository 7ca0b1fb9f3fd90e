"""A custom pipeline for the tests: text2img, img2img and inpaint methods plus an extra `upscale_noop`."""

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline


class TinyTasksPipeline(StableDiffusionPipeline):
    def text2img(self, prompt=None, **kwargs):
        return self(prompt=prompt, **kwargs)

    def img2img(self, prompt=None, image=None, **kwargs):
        return StableDiffusionImg2ImgPipeline(**self.components)(prompt=prompt, image=image, **kwargs)

    def inpaint(self, prompt=None, image=None, mask_image=None, **kwargs):
        pipe = StableDiffusionInpaintPipeline(**self.components)
        return pipe(prompt=prompt, image=image, mask_image=mask_image, **kwargs)

    def upscale_noop(self, image=None, factor: int = 1):
        """Returns the image unchanged, and the factor it was asked for."""
        return {"images": [image], "factor": factor}
