"""ComfyUI nodes for TAG-MoE: thin adapters from ComfyUI's types to ``tagmoe_core``."""

from . import comfy_bridge
from .diffusers.decode import TagMoEDecode
from .diffusers.loader import TagMoEModelLoader
from .diffusers.sampler import TagMoESampler
from .diffusers.text_encode import TagMoETextEncode
from .intent.prompt_refine import TagMoEPromptRefine
from .intent.routing_map import TagMoERoutingMap
from .intent.task_tags import TagMoETaskTags

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
