"""What a TAG-MoE ``.gguf`` holds: its architecture string, metadata keys, and which GGML type each tensor gets.

The file follows ComfyUI-GGUF's image-model files (city96/ComfyUI-GGUF ``tools/convert.py``): tensors
named by the ComfyUI state-dict keys, in the row-major shape of the weight (GGUF stores the dimensions
reversed; a reader reverses them back), with ``comfy.gguf.orig_shape.<name>`` where a tensor was
reshaped to fit GGUF's 4 dimensions. The MoE layers are in the per-expert Linear layout of
``expert_layout`` (``img_mlp.router.weight``, ``img_mlp.experts.{e}.w1/w2.weight``), the one the
native ComfyUI model loads; ``experts.bias`` (never added) is not kept.

``general.architecture`` is :data:`ARCH`, not ComfyUI-GGUF's ``qwen_image``: its UnetLoaderGGUF accepts
only architectures it knows and would build a dense Qwen-Image from a ``qwen_image`` file, dropping
every expert without an error; with this string it refuses the file ("Unexpected architecture type").
"""

from __future__ import annotations

from .gguf_dequant import TYPES, GGMLType

ARCH = "tagmoe_qwen_image"
FORMAT_VERSION = 1
QWEN_IMAGE_ARCH = "qwen_image"  # what ComfyUI-GGUF's dense Qwen-Image files say
KEY_CONFIG = f"{ARCH}.config"  # the transformer config as JSON (as 'tagmoe convert' writes for safetensors)
KEY_FORMAT = f"{ARCH}.format_version"
KEY_MOE_BLOCKS = f"{ARCH}.moe_blocks"
KEY_EXPERTS = f"{ARCH}.expert_count"  # llama.cpp's names for MoE models
KEY_TOP_K = f"{ARCH}.expert_used_count"
KEY_EXPERT_FFN = f"{ARCH}.expert_feed_forward_length"
KEY_QUANT = f"{ARCH}.quantization"  # the type asked for (--quant); the kept tensors are finer
ORIG_SHAPE = "comfy.gguf.orig_shape."
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME less the terminator

# The types ``tagmoe convert --quant`` writes (gguf-py quantizes them; the K-quants: gguf_kquants).
QUANT_TYPES: tuple[str, ...] = ("Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "BF16", "F16", "F32")
FLOAT_TYPES = ("F32", "F16", "BF16")
# The types the reader accepts: those, and the K-quants Q4_K, Q5_K, Q6_K (other tools write them).
READABLE: dict[str, GGMLType] = dict(TYPES)

def stored_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a tensor is written in: as it is, or its leading dimensions merged to fit GGUF's 4."""
    if len(shape) <= MAX_DIMS:
        return shape
    rows = 1
    for d in shape[:-(MAX_DIMS - 1)]:
        rows *= d
    return (rows, *shape[-(MAX_DIMS - 1):])
