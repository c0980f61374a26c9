"""TAG-MoE Sampler: conditioning (+ image, mask, latent) -> LATENT in ComfyUI's Qwen-Image format."""

from __future__ import annotations

import torch

from ...tagmoe_core.errors import InputError
from .. import comfy_bridge as bridge
from ..conversions import ORIGINAL_SIZE_KEY, image_batch_to_pil, latent_to_batch, mask_batch


class TagMoESampler:
    DESCRIPTION = ("Denoises with the TAG-MoE transformer. With an image it edits it (a mask limits the edit "
                   "to the mask's bounding box); without one it makes a new image. The LATENT works with "
                   "ComfyUI's Qwen-Image nodes (VAE Decode with the Qwen-Image VAE, latent upscalers).")
    CATEGORY = "TAG-MoE"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "INT", "TAGMOE_ROUTING")
    RETURN_NAMES = ("latent", "seed", "routing")
    OUTPUT_TOOLTIPS = ("Qwen-Image latents [batch, 16, 1, height/8, width/8]", "the seed used",
                       "the recorded routing (with record_routing; of the first input image)")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("TAGMOE_MODEL", {"tooltip": "from TAG-MoE Model Loader"}),
                "conditioning": ("TAGMOE_CONDITIONING", {"tooltip": "from TAG-MoE Text Encode"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "the noise seed; the same seed, inputs and model give the same image"}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 200, "tooltip": "denoising steps (reference: 30)"}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 20.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "true CFG scale with norm rescale (reference: 4.0); <= 1 skips the "
                                             "negative prompt and halves the time"}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                  "tooltip": "output width, a multiple of 16; 0 = the input image's preferred "
                                             "bucket (1024 without an image, or the latent's size)"}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 16,
                                   "tooltip": "output height, a multiple of 16; 0 = as for width"}),
                "images_per_prompt": ("INT", {"default": 1, "min": 1, "max": 16,
                                              "tooltip": "images to make for each input image"}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "the image to edit; unconnected = text-to-image. A batch edits "
                                               "each image with the same seed"}),
                "mask": ("MASK", {"tooltip": "region edit: only the mask's bounding box of the image conditions "
                                             "the edit (same size as the image)"}),
                "latent": ("LATENT", {"tooltip": "start from these latents (e.g. VAE Encode with the Qwen-Image "
                                                 "VAE) instead of pure noise; set denoise below 1"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "with a latent: how much of the schedule to run (1 = all, "
                                                 "ignoring the latent's content)"}),
                "tags": ("TAGMOE_TAGS", {"tooltip": "the task, for tag guidance (from TAG-MoE Task Tags)"}),
                "tag_guidance": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                           "tooltip": "steer the MoE routers toward the gate distribution that best "
                                                      "expresses the tags; 0 = the release's behaviour exactly"}),
                "record_routing": ("BOOLEAN", {"default": False, "tooltip": "record every MoE routing decision "
                                                                            "for TAG-MoE Routing Map"}),
                "region": ("STRING", {"default": "", "tooltip": (
                    "region edit without a mask: x1,y1,x2,y2 as fractions of the image (e.g. 0.25,0.25,0.75,0.75); "
                    "a connected mask takes precedence; empty = the whole image")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, conditioning, seed, steps, cfg, width=0, height=0, images_per_prompt=1, image=None,
               mask=None, latent=None, denoise=1.0, tags=None, tag_guidance=0.0, record_routing=False, region="",
               unique_id=None):
        from ...tagmoe_core.intent.routing import RoutingRecorder
        from ...tagmoe_core.pipeline.regions import box_from_fractions, mask_box, region_from_pixel_box

        pipe = model.require()
        if (width == 0) != (height == 0):
            raise InputError("set both width and height, or leave both at 0 (automatic)")
        size = {"width": width or None, "height": height or None}
        pictures = image_batch_to_pil(image) if image is not None else [None]
        masks = mask_batch(mask) if mask is not None else None
        if masks is not None and image is None:
            raise InputError("a mask needs an image to edit: connect the image the mask was drawn on")
        if masks is not None and masks.shape[0] not in (1, len(pictures)):
            raise InputError(f"{masks.shape[0]} masks for {len(pictures)} images: give one mask, or one per image")
        fractions = region if masks is None else ""
        if str(fractions).strip() and image is None:
            raise InputError("a region needs an image to edit: connect the image")
        init = latent_to_batch(latent) if latent is not None else None
        num_images = images_per_prompt
        if init is not None and init.shape[0] > 1 and images_per_prompt == 1:
            num_images = init.shape[0]

        runs = len(pictures)
        steps_per_run = max(1, min(steps, round(steps * denoise))) if init is not None and denoise < 1 else steps
        progress = bridge.Progress(runs * steps_per_run, unique_id)
        if tag_guidance and tags is None:
            raise InputError("tag_guidance needs tags: connect a TAG-MoE Task Tags node to 'tags'")
        outputs, original_sizes, recorder = [], [], None
        for index, picture in enumerate(pictures):
            box = mask_box(masks[min(index, masks.shape[0] - 1)], picture.size) if masks is not None \
                else box_from_fractions(fractions, picture.size) if picture is not None else None
            patches = None
            if box is not None:
                target = pipe.target_size(picture, size["width"], size["height"], init)  # as sample() will
                patches = region_from_pixel_box(box, picture.size, target)

            def on_step(info, done=index * steps_per_run):
                progress.update(done + info.step + 1, info.denoised_latents())

            run_recorder = RoutingRecorder() if record_routing and index == 0 else None
            recorder = recorder or run_recorder
            out = pipe.sample(conditioning, picture, steps=steps, cfg=cfg, seed=seed, num_images=num_images,
                              region=patches, callback=on_step, init_latents=init, denoise_strength=denoise,
                              before_pass=lambda step, name: bridge.check_interrupt(), recorder=run_recorder,
                              tags=tags, tag_guidance=tag_guidance, **size)
            outputs.append(out.latents)
            original_sizes += [out.original_size] * out.latents.shape[0]
        samples = torch.cat(outputs).to(bridge.intermediate_device())
        result = {"samples": samples}
        if pictures[0] is not None:
            result[ORIGINAL_SIZE_KEY] = original_sizes
        h, w = samples.shape[-2] * 8, samples.shape[-1] * 8
        text = f"seed {seed}, {samples.shape[0]} image(s) {w}x{h}"
        if tag_guidance:
            text += f", tag guidance {tag_guidance:g} toward g* = " + ", ".join(f"{v:.2f}" for v in out.g_star.tolist())
        routing = recorder.recording if recorder is not None else None
        return {"ui": {"text": [text], "seed": [seed]}, "result": (result, seed, routing)}
