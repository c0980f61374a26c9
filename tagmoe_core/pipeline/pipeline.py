"""TAG-MoE editing and text-to-image, in stages a node graph can hold apart.

``encode`` (text) -> ``sample`` (condition image, noise, denoising; returns VAE latents)
-> ``decode`` (pixels). ``edit`` and ``generate`` chain them the way the reference's
``infer.py`` does, with its defaults.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ..errors import DeviceError, InputError
from ..intent.routing import RoutingRecorder
from ..intent.routing import tag_guidance as guided_routing
from ..intent.vlm import default_vlm_image_processor
from ..model.positions import RegionShape
from ..runtime.devices import module_device
from ..runtime.memory import available_bytes
from ..taxonomy import TaskTags
from .buckets import DEFAULT_SIZE, target_size
from .checks import check_number
from .condition import condition_pixels, vae_input
from .latents import PIXELS_PER_TOKEN, denormalize, normalize, pack, unpack
from .placement import QWEN_VAE_BASE_DIM, TEXT_TOKENS, RunEstimate, check_run_fits
from .regions import check_patch_box
from .sampling import DenoiseInputs, StepCallback, denoise, make_schedule
from .schedule import check_denoise
from .text_encoding import PromptEmbeds, encode_prompt_with_image, encode_prompts, normalize_negative_prompt

log = logging.getLogger("tagmoe")

DEFAULT_STEPS = 30
DEFAULT_CFG = 4.0
MAX_SEED = 2**64 - 1


@dataclass
class Conditioning:
    """Encoded positive and negative prompts (text encoding is independent of the seed)."""

    positive: PromptEmbeds
    negative: PromptEmbeds
    prompt: str = ""
    negative_prompt: str = " "


@dataclass
class ConditionImage:
    """A condition image made ready for the transformer."""

    tokens: torch.Tensor  # [1, M, 64] model-space tokens (a region crop when ``region`` is set)
    width: int  # pixels the condition was encoded at (= the target size, as in the reference)
    height: int
    original_size: tuple[int, int]  # (w, h) of the image as given
    region: RegionShape | None = None

    @property
    def img_shape(self) -> tuple[int, int, int] | RegionShape:
        if self.region is not None:
            return self.region
        return (1, self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN)


@dataclass
class SampleOutput:
    latents: torch.Tensor  # VAE latents [B, 16, 1, H/8, W/8], un-normalised, float32 (ComfyUI's LATENT)
    seed: int
    width: int
    height: int
    original_size: tuple[int, int] | None = None
    g_star: torch.Tensor | None = None  # the gate distribution tag guidance steered toward


@dataclass
class EditResult:
    images: list[Image.Image]
    seed: int
    latents: torch.Tensor = field(repr=False)


def resized_back(images: list[Image.Image], original: Image.Image) -> list[Image.Image]:
    """Edit outputs resized to the input's size (``keep_original_size``, as the reference does)."""
    return [im.resize(original.size, Image.LANCZOS) for im in images]


def resolve_seed(seed: int | None) -> int:
    """-1 (or None) draws a random seed, like the reference; others must fit in 64 bits."""
    if seed is None or int(seed) == -1:
        return secrets.randbelow(2**32)
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}")
    return seed


class TagMoEPipeline:
    """Components: the TAG-MoE transformer, the Qwen-Image VAE, the Qwen2.5-VL text encoder,
    its tokenizer (and optional processor, for the image-aware prompt variant), and the
    scheduler config."""

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, vlm_image_processor=None,
                 execution_device: torch.device | None = None, dtype: torch.dtype | None = None):
        self.transformer = transformer
        # Where the denoising runs and in which dtype: explicit, because with offloading the
        # weights may sit in host memory, and with fp8 storage they are not in the compute dtype.
        self._execution_device = execution_device
        self._dtype = dtype or transformer.dtype
        self.offloaded: set[str] = set()  # components kept in host memory that visit the GPU to run
        # GPU-resident modules that step out while the text encoder visits (the transformer in
        # "single" with the text encoder dropped, the resident blocks in block-swap).
        self.evict_for_text_encoder: list[torch.nn.Module] = []
        self._visits: dict[str, int] = {}
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self._vlm_image_processor = vlm_image_processor

    @property
    def device(self) -> torch.device:
        return self._execution_device or module_device(self.transformer)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @contextlib.contextmanager
    def using(self, name: str):
        """Bring an offloaded component to the execution device for the ``with`` block (nested
        uses move it once), making room first if the placement says so."""
        module = getattr(self, name)
        if name not in self.offloaded or self._visits.get(name):
            self._visits[name] = self._visits.get(name, 0) + 1
            try:
                yield module
            finally:
                self._visits[name] -= 1
            return
        evicted = self.evict_for_text_encoder if name == "text_encoder" else []
        for other in evicted:
            other.to("cpu")
        self._visits[name] = 1
        try:
            module.to(self.device)
            yield module
        finally:
            self._visits[name] = 0
            module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            for other in evicted:
                other.to(self.device)

    @property
    def vlm_image_processor(self):
        """Qwen2.5-VL's image processor, for prompts that show the text encoder an image."""
        if self._vlm_image_processor is None:
            self._vlm_image_processor = default_vlm_image_processor()
        return self._vlm_image_processor

    # -- text -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, image: Image.Image | None = None) -> PromptEmbeds:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be text, got {type(prompt).__name__}")
        with self.using("text_encoder") as text_encoder:
            if image is not None:
                embeds = encode_prompt_with_image(text_encoder, self.tokenizer, self.vlm_image_processor, prompt, image)
            else:
                embeds = encode_prompts(text_encoder, self.tokenizer, [prompt])
        return embeds.to(self.device, self.dtype)

    def encode(self, prompt: str, negative_prompt: str | None = "", image: Image.Image | None = None) -> Conditioning:
        """Both prompts; ``image`` selects the image-aware variant (the reference's ``use_vlm``)."""
        negative = normalize_negative_prompt(negative_prompt)
        with self.using("text_encoder"):  # one visit for both prompts
            return Conditioning(self.encode_prompt(prompt, image), self.encode_prompt(negative, image), prompt,
                                negative)

    # -- condition image ------------------------------------------------------------------------
    def target_size(self, image: Image.Image | None, width: int | None, height: int | None,
                    init_latents: torch.Tensor | None = None) -> tuple[int, int]:
        """Output size: given, else that of ``init_latents``, else the condition's bucket (edit)
        or 1024 (text-to-image)."""
        return target_size(image, width, height, init_latents)

    @torch.inference_mode()
    def prepare_condition(self, image: Image.Image, width: int, height: int,
                          region: Sequence[int] | None = None, generator: torch.Generator | None = None,
                          posterior: str = "sample") -> ConditionImage:
        """Snap to the nearest preferred bucket (RGBA on white, Lanczos), resize to the target
        size, VAE-encode, normalise and pack. ``posterior`` "sample" draws the latent from
        ``generator`` (the reference samples it); "mode" takes its mean (what ComfyUI's VAE Encode
        gives). ``region`` (x1, y1, x2, y2; inclusive patch units) keeps only that box of tokens."""
        if not isinstance(image, Image.Image):
            raise InputError(f"the condition image must be a PIL image, got {type(image).__name__}")
        if posterior not in ("sample", "mode"):
            raise InputError(f"posterior must be 'sample' or 'mode', got {posterior!r}")
        tokens = self.encode_condition(condition_pixels(image, width, height), generator, posterior)
        region_shape = None
        if region is not None:
            gh, gw = height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN
            region_shape = RegionShape(gh, gw, tuple(int(v) for v in region))
            x1, y1, x2, y2 = region_shape.box
            tokens = tokens.view(1, gh, gw, -1)[:, y1:y2 + 1, x1:x2 + 1].reshape(1, -1, tokens.shape[-1])
        return ConditionImage(tokens, width, height, image.size, region_shape)

    @torch.inference_mode()
    def encode_condition(self, pixels: torch.Tensor,
                         generator: torch.Generator | list[torch.Generator] | None = None,
                         posterior: str = "sample") -> torch.Tensor:
        """Condition pictures [B, H, W, 3] in 0..1 (``condition_pixels``'s, one size) -> their tokens [B, N, C]:
        VAE-encoded in one batch, the posterior sampled from ``generator`` (or, a list of one per picture,
        each picture's draw as it would be alone) or its mean ("mode"), normalised and packed."""
        vae_device = next(self.vae.parameters()).device
        dist = self.vae.encode(vae_input(pixels).to(vae_device, self.vae.dtype)).latent_dist
        latent = dist.sample(generator=generator) if posterior == "sample" else dist.mode()
        return pack(normalize(latent, self.vae.config).to(self.device, self.dtype))

    # -- sampling -------------------------------------------------------------------------------
    @torch.inference_mode()
    def sample(self, conditioning: Conditioning, image: Image.Image | None = None, *, width: int | None = None,
               height: int | None = None, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = -1,
               num_images: int = 1, region: Sequence[int] | None = None, callback: StepCallback | None = None,
               init_latents: torch.Tensor | None = None, denoise_strength: float = 1.0,
               before_pass: Callable[[int, str], None] | None = None, recorder: RoutingRecorder | None = None,
               tags: TaskTags | None = None, tag_guidance: float = 0.0, posterior: str = "sample") -> SampleOutput:
        """Denoise to VAE latents. ``image`` given: edit it; else text-to-image.

        ``init_latents`` (VAE latents [B or 1, 16, 1, H/8, W/8]) with ``denoise_strength`` < 1
        starts from them instead of pure noise (image-to-image). ``callback`` runs after every
        step, ``before_pass(step, pass)`` before every transformer pass; either stops the run by
        raising. ``recorder`` records the routing; ``tag_guidance`` > 0 steers the routers
        toward the gate distribution that best expresses ``tags`` (0: the release's behaviour).
        """
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise InputError(f"num_images must be at least 1, got {num_images}")
        # Every check that needs no work runs before the condition image is encoded.
        denoise_strength = check_denoise(denoise_strength)
        cfg = check_number("cfg", cfg, minimum=0)
        tag_guidance = check_number("tag_guidance", tag_guidance)
        if region is not None and image is None:
            raise InputError("a region edit needs a condition image")
        width, height = self.target_size(image, width, height, init_latents)
        share = 0.0 if image is None else 1.0  # condition tokens per target token
        if region is not None:
            region = check_patch_box(region)
            box = RegionShape(height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN, region)  # fits the grid
            share = box.num_tokens / (box.height * box.width)
        text_tokens = max(conditioning.positive.embeds.shape[1], conditioning.negative.embeds.shape[1])
        self.check_run_memory(width, height, num_images, share, text_tokens,
                              "edit" if image is not None else "text-to-image")
        seed = resolve_seed(seed)
        device, dtype = self.device, self.dtype
        generator = torch.Generator(device=device).manual_seed(seed)

        h, w = height // 8, width // 8
        noise = randn_tensor((num_images, 1, 16, h, w), generator=generator, device=device, dtype=dtype)
        latents = pack(noise.reshape(num_images, 16, h, w))  # drawn as (B, 1, C, h, w), as the reference
        condition = (self.prepare_condition(image, width, height, region, generator, posterior)
                     if image is not None else None)

        scheduler, timesteps = make_schedule(self.scheduler.config, steps, latents.shape[1], device, denoise_strength)
        if init_latents is not None and denoise_strength < 1.0:
            latents = self._noised_init(init_latents, latents, scheduler, timesteps, num_images, h, w)

        img_shapes: list = [(1, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)]
        cond_tokens = None
        if condition is not None:
            img_shapes.append(condition.img_shape)
            cond_tokens = condition.tokens.expand(num_images, -1, -1)
        inputs = DenoiseInputs(latents, img_shapes, conditioning.positive.to(device).repeat(num_images),
                               conditioning.negative.to(device).repeat(num_images), cond_tokens)
        def before(step: int, name: str) -> None:
            if recorder is not None:
                recorder.before_pass(step, name)
            if before_pass is not None:
                before_pass(step, name)

        with contextlib.ExitStack() as stack:
            if recorder is not None:
                stack.enter_context(recorder.attached(self.transformer))
                grid = None
                if condition is not None:
                    shape = condition.img_shape
                    grid = ((shape.box[3] - shape.box[1] + 1, shape.box[2] - shape.box[0] + 1)
                            if isinstance(shape, RegionShape) else shape[1:])
                recorder.set_layout(latents.shape[1], (height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN), grid)
            g_star = stack.enter_context(guided_routing(self.transformer, tags, tag_guidance, device, dtype))
            transformer = stack.enter_context(self.using("transformer"))
            out = denoise(transformer, scheduler, timesteps, inputs, float(cfg), height, width,
                          self.vae.config, callback, before)
        vae_latents = denormalize(unpack(out, height, width).to(self.vae.dtype), self.vae.config)
        return SampleOutput(vae_latents.float(), seed, width, height, condition.original_size if condition else None,
                            g_star)

    def run_estimate(self) -> RunEstimate:
        """What a run allocates beyond the weights, from this model's shapes and dtypes."""
        config = getattr(self.transformer, "config", {})
        hidden = getattr(self.transformer, "inner_dim", None) or \
            config["num_attention_heads"] * config["attention_head_dim"]
        vae_device = next(self.vae.parameters()).device
        return RunEstimate(int(hidden), self.dtype.itemsize, int(self.vae.config.get("base_dim", QWEN_VAE_BASE_DIM)),
                           self.vae.dtype.itemsize, tiled_decode=vae_device.type == "cuda")

    def check_run_memory(self, width: int, height: int, num_images: int = 1, condition_share: float = 1.0,
                         text_tokens: int = TEXT_TOKENS, what: str = "run") -> None:
        """Refuse a run (sampling and decoding) that does not fit the memory left on the devices it
        allocates on, the CPU included, naming a size that would (``placement.check_run_fits``).
        A transformer that visits the GPU to run (model-offload) or streams its blocks through it
        (block-swap) adds its weights, or two blocks, to the execution device's share."""
        execution = self.device
        vae_device = next(self.vae.parameters()).device
        visiting = 0  # weights that come to the execution device for the denoising only
        if "transformer" in self.offloaded:
            visiting = sum(p.numel() * p.element_size() for p in self.transformer.parameters())
        elif getattr(getattr(self, "placement", None), "mode", None) == "block-swap":
            visiting = 2 * max(sum(p.numel() * p.element_size() for p in block.parameters())
                               for block in self.transformer.transformer_blocks)
        devices: dict[str, dict[str, int]] = {str(execution): {"denoising": visiting}}
        for device in {p.device for p in self.transformer.parameters() if p.device.type == "cuda"} - {execution}:
            devices[str(device)] = {"denoising": 0}  # multi-gpu: every GPU holding blocks sees the activations
        devices.setdefault(str(vae_device), {}).update({"encoding the image": 0, "decoding": 0})
        available = {name: available_bytes(name) for name in devices}
        check_run_fits(self.run_estimate(), width, height, num_images, condition_share, text_tokens, devices,
                       available, what)

    def _noised_init(self, init_latents, noise_tokens, scheduler, timesteps, num_images, h, w) -> torch.Tensor:
        if tuple(init_latents.shape[-2:]) != (h, w) or init_latents.shape[1] != 16:
            raise InputError(f"init latents of shape {tuple(init_latents.shape)} do not match the "
                             f"{w * 8}x{h * 8} output (expected [B, 16, 1, {h}, {w}])")
        init = init_latents if init_latents.ndim == 5 else init_latents[:, :, None]
        if init.shape[0] not in (1, num_images):
            raise InputError(f"init latents hold {init.shape[0]} images but {num_images} were asked for")
        init = normalize(init.to(self.device, self.dtype), self.vae.config).expand(num_images, -1, -1, -1, -1)
        return scheduler.scale_noise(pack(init), timesteps[:1], noise_tokens)

    # -- pixels ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """VAE latents [B, 16, 1, h, w] -> images [B, H, W, 3] float32 in 0..1 (on the CPU).

        ``tiled``: decode in overlapping tiles (a fraction of the memory, seams blended); None
        decodes whole and falls back to tiles when the GPU runs out of memory, so a finished
        sampling run is not lost to its last step.
        """
        if latents.ndim == 4:
            latents = latents[:, :, None]
        vae_device = next(self.vae.parameters()).device
        z = latents.to(vae_device, self.vae.dtype)
        width, height = z.shape[-1] * 8, z.shape[-2] * 8
        out = None
        try:
            out = self._vae_decode(z, bool(tiled))
        except torch.OutOfMemoryError as error:
            if tiled is not None:
                raise DeviceError(f"out of GPU memory decoding {width}x{height}{' in tiles' if tiled else ''}: free "
                                  "memory (another model?), decode smaller images"
                                  f"{'' if tiled else ', or decode in tiles (tiled: auto or always)'}") from error
            log.warning("out of GPU memory decoding %dx%d whole; decoding it in tiles instead", width, height)
        finally:
            # A decode that failed partway leaves the causal convolutions' feature cache behind.
            self.vae.clear_cache()
        if out is None:
            # Retried here, not in the except block: the exception's traceback keeps the failed
            # decode's activations alive until the block is left.
            gc.collect()
            if z.device.type == "cuda":
                torch.cuda.empty_cache()
            return self.decode(latents, tiled=True)
        out = out[:, :, 0].float()
        if not torch.isfinite(out).all():
            log.warning("the decoded image has NaN/inf values (numeric overflow?); they are shown as black")
            out = torch.nan_to_num(out, nan=-1.0, posinf=1.0, neginf=-1.0)
        return (out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    def _vae_decode(self, z: torch.Tensor, tiled: bool) -> torch.Tensor:
        if tiled:  # diffusers' tiles: 256 px, stride 192, blended
            return self.vae.tiled_decode(z, return_dict=False)[0]
        return self.vae.decode(z, return_dict=False)[0]

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        arrays = (images.numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]

    # -- one call -------------------------------------------------------------------------------
    def edit(self, image: Image.Image, prompt: str, negative_prompt: str | None = "", *, width: int | None = None,
             height: int | None = None, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = -1,
             num_images: int = 1, keep_original_size: bool = False, region: Sequence[int] | None = None,
             use_vlm: bool = False, callback: StepCallback | None = None) -> EditResult:
        """Edit ``image`` following ``prompt`` (the reference's ``End2End.predict``)."""
        if image is None:
            raise InputError("edit needs an input image; use generate() for text-to-image")
        conditioning = self.encode(prompt, negative_prompt, image if use_vlm else None)
        out = self.sample(conditioning, image, width=width, height=height, steps=steps, cfg=cfg, seed=seed,
                          num_images=num_images, region=region, callback=callback)
        images = self.to_pil(self.decode(out.latents))
        if keep_original_size and width is None and height is None:
            images = resized_back(images, image)
        return EditResult(images, out.seed, out.latents)

    def generate(self, prompt: str, negative_prompt: str | None = "", *, width: int = DEFAULT_SIZE,
                 height: int = DEFAULT_SIZE, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = -1,
                 num_images: int = 1, callback: StepCallback | None = None) -> EditResult:
        """Text-to-image: the same model and loop without a condition image."""
        conditioning = self.encode(prompt, negative_prompt)
        out = self.sample(conditioning, None, width=width, height=height, steps=steps, cfg=cfg, seed=seed,
                          num_images=num_images, callback=callback)
        return EditResult(self.to_pil(self.decode(out.latents)), out.seed, out.latents)
