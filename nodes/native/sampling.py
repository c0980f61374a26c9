"""The reference's sampling for ComfyUI's samplers: TAG-MoE Scheduler (SIGMAS), TAG-MoE CFG Guider
(GUIDER), TAG-MoE CFG (a MODEL patch for KSampler) and TAG-MoE Noise (NOISE)."""

from __future__ import annotations

from ...tagmoe_core.pipeline.checks import check_number, check_size
from ...tagmoe_core.pipeline.schedule import image_seq_len, reference_sigmas


class TagMoEScheduler:
    DESCRIPTION = ("The TAG-MoE reference's sigmas: FlowMatch Euler with Qwen-Image's dynamic shift for the image "
                   "size (from the latent, or width and height), stretched to end at 0.02, then 0. Use with "
                   "SamplerCustomAdvanced and the euler sampler to sample as the reference does.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "sigmas"
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("the sigmas to walk through (final 0 included)",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "denoising steps (reference: 30)"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": (
                    "below 1: run only the last steps * denoise steps (to start from a given latent)")}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "the latent to denoise: its size sets the shift (else width/height)"}),
                "width": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                  "tooltip": "the image width, when no latent is connected"}),
                "height": ("INT", {"default": 1024, "min": 16, "max": 8192, "step": 16,
                                   "tooltip": "the image height, when no latent is connected"}),
            },
        }

    def sigmas(self, steps, denoise=1.0, latent=None, width=1024, height=1024):
        check_number("denoise", denoise)
        if latent is not None:  # its tokens as the transformer counts them (it pads to whole 2x2 patches)
            h, w = latent["samples"].shape[-2:]
            tokens = ((h + 1) // 2) * ((w + 1) // 2)
        else:
            tokens = image_seq_len(check_size("height", height), check_size("width", width))
        return (reference_sigmas(int(steps), tokens, float(denoise)),)


class TagMoECFGGuider:
    DESCRIPTION = ("The TAG-MoE reference's true CFG as a GUIDER for SamplerCustomAdvanced: neg + cfg*(pos-neg), "
                   "each 2x2 latent token rescaled to the norm of the conditional prediction (no clamp); at cfg <= "
                   "1 only the positive prompt runs.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "guider"
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "from TAG-MoE Load Diffusion Model (LoRAs and patches welcome)"}),
                "positive": ("CONDITIONING", {"tooltip": "the instruction (an edit: from TAG-MoE Edit Conditioning)"}),
                "negative": ("CONDITIONING", {"tooltip": "the negative prompt"}),
                "cfg": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "true CFG scale (reference: 4.0)"}),
            },
        }

    def guider(self, model, positive, negative, cfg):
        from ..comfy_sampling import ReferenceCFGGuider

        guider = ReferenceCFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(check_number("cfg", cfg, minimum=0))
        return (guider,)


class TagMoECFG:
    DESCRIPTION = ("Makes any sampler (KSampler too) combine the prompts with the TAG-MoE reference's true CFG "
                   "and per-token norm rescale, at the sampler's cfg. Not ComfyUI's CFGNorm, which clamps and works "
                   "per channel.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "the TAG-MoE MODEL to sample with"})}}

    def patch(self, model):
        from ..comfy_sampling import with_reference_cfg

        return (with_reference_cfg(model),)


NOISE_DEVICES = ["reference (model device and dtype)", "cpu float32 (ComfyUI's)"]


class TagMoENoise:
    DESCRIPTION = ("Noise drawn as the TAG-MoE reference draws it: from a generator seeded on the device the model "
                   "runs on, in its compute dtype (bf16 on GPUs). On a GPU this gives the reference's images for a "
                   "seed; ComfyUI's RandomNoise draws float32 on the CPU (the same only on the CPU).")
    CATEGORY = "TAG-MoE"
    FUNCTION = "noise"
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the model that will denoise (its device and dtype)"}),
                "noise_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                       "control_after_generate": True, "tooltip": "the seed"}),
                "draw_on": (NOISE_DEVICES, {"default": NOISE_DEVICES[0], "tooltip": (
                    "reference: as the TAG-MoE reference draws it (same image for a seed as its CLI); cpu: as "
                    "ComfyUI's RandomNoise")}),
            },
        }

    def noise(self, model, noise_seed, draw_on=NOISE_DEVICES[0]):
        import torch

        from ..comfy_sampling import ReferenceNoise, model_compute

        if draw_on == NOISE_DEVICES[0]:
            device, dtype = model_compute(model)
        else:
            device, dtype = torch.device("cpu"), torch.float32
        return (ReferenceNoise(noise_seed, device, dtype),)
