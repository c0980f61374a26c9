"""ComfyUI nodes for TAG-MoE: thin adapters from ComfyUI's types to ``tagmoe_core``."""

from . import comfy_bridge
from .decode import TagMoEDecode
from .loader import TagMoEModelLoader
from .prompt_refine import TagMoEPromptRefine
from .routing_map import TagMoERoutingMap
from .sampler import TagMoESampler
from .task_tags import TagMoETaskTags
from .text_encode import TagMoETextEncode

comfy_bridge.register_model_folder()

NODE_CLASS_MAPPINGS = {
    "TagMoEModelLoader": TagMoEModelLoader,
    "TagMoETextEncode": TagMoETextEncode,
    "TagMoESampler": TagMoESampler,
    "TagMoEDecode": TagMoEDecode,
    "TagMoETaskTags": TagMoETaskTags,
    "TagMoEPromptRefine": TagMoEPromptRefine,
    "TagMoERoutingMap": TagMoERoutingMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TagMoEModelLoader": "TAG-MoE Model Loader",
    "TagMoETextEncode": "TAG-MoE Text Encode",
    "TagMoESampler": "TAG-MoE Sampler",
    "TagMoEDecode": "TAG-MoE Decode",
    "TagMoETaskTags": "TAG-MoE Task Tags",
    "TagMoEPromptRefine": "TAG-MoE Prompt Refine",
    "TagMoERoutingMap": "TAG-MoE Routing Map",
}
