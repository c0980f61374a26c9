"""Qwen2.5-VL inputs without its processor class: the image resized as ``qwen_vl_utils`` does,
pixel patches from the (PIL) image processor, and chat text with one ``<|image_pad|>`` per merged
patch. Used by the image-aware prompt variant and by the VLM refinement/tagging backends."""

from __future__ import annotations

import torch
from PIL import Image

from ..images import to_rgb

VLM_MIN_PIXELS = 4 * 28 * 28  # qwen_vl_utils' limits, also Qwen2.5-VL's processor config
VLM_MAX_PIXELS = 16384 * 28 * 28


def vlm_image(image: Image.Image, factor: int = 28, min_pixels: int = VLM_MIN_PIXELS,
              max_pixels: int = VLM_MAX_PIXELS) -> Image.Image:
    """The image as ``qwen_vl_utils.process_vision_info`` hands it to the processor: RGB, resized
    (bicubic) to the nearest size made of whole 28-pixel patches within the pixel limits."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rgb = to_rgb(image)
    height, width = smart_resize(rgb.height, rgb.width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    return rgb.resize((width, height), Image.BICUBIC)


def default_vlm_image_processor():
    """Qwen2.5-VL's image processor settings (the PIL implementation: no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(size={"shortest_edge": VLM_MIN_PIXELS, "longest_edge": VLM_MAX_PIXELS})


def vlm_inputs(tokenizer, image_processor, text: str, images: list[Image.Image], max_length: int | None = None,
               device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """What ``Qwen2_5_VLProcessor`` makes of chat text and images: pixel patches, their grid,
    and the text with each ``<|image_pad|>`` expanded to one token per merged patch."""
    processed = image_processor(images=images, return_tensors="pt")
    grids = processed["image_grid_thw"]
    merge = image_processor.merge_size ** 2
    parts = text.split("<|image_pad|>")
    if len(parts) - 1 != len(images):
        raise ValueError(f"{len(parts) - 1} image placeholders for {len(images)} images")
    expanded = parts[0]
    for grid, rest in zip(grids, parts[1:]):
        expanded += "<|image_pad|>" * int(grid.prod() // merge) + rest
    tokens = tokenizer([expanded], truncation=max_length is not None, max_length=max_length, padding=True,
                       return_tensors="pt")
    out = {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask,
           "pixel_values": processed["pixel_values"], "image_grid_thw": grids}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
