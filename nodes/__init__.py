"""ComfyUI nodes for TAG-MoE: thin adapters from ComfyUI's types to ``tagmoe_core``."""

from . import comfy_bridge
from .decode import TagMoEDecode
from .loader import TagMoEModelLoader
from .sampler import TagMoESampler
from .text_encode import TagMoETextEncode

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "TagMoEModelLoader": TagMoEModelLoader,
    "TagMoETextEncode": TagMoETextEncode,
    "TagMoESampler": TagMoESampler,
    "TagMoEDecode": TagMoEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TagMoEModelLoader": "TAG-MoE Model Loader",
    "TagMoETextEncode": "TAG-MoE Text Encode",
    "TagMoESampler": "TAG-MoE Sampler",
    "TagMoEDecode": "TAG-MoE Decode",
}
