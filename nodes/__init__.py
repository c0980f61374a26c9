"""ComfyUI nodes for TAG-MoE: thin adapters from ComfyUI's types to ``tagmoe_core``."""

from . import comfy_bridge
from .diffusers.decode import TagMoEDecode
from .diffusers.loader import TagMoEModelLoader
from .diffusers.sampler import TagMoESampler
from .diffusers.text_encode import TagMoETextEncode
from .intent.prompt_refine import TagMoEPromptRefine
from .intent.routing_map import TagMoERoutingMap
from .intent.task_tags import TagMoETaskTags
from .native.conditioning import TagMoEEditConditioning, TagMoETextEncodeDiffusers
from .native.loader import TagMoELoadDiffusionModel
from .native.lora import TagMoELoraLoader
from .native.patches import TagMoERecordRouting, TagMoETagGuidance
from .native.sampling import TagMoECFG, TagMoECFGGuider, TagMoENoise, TagMoEScheduler

comfy_bridge.register_model_folder()
comfy_bridge.guard_builtin_gguf_loader()  # a TAG-MoE .gguf in a ComfyUI loader that reads .gguf: refused

NODE_CLASS_MAPPINGS = {
    # TAG-MoE as a native ComfyUI MODEL
    "TagMoELoadDiffusionModel": TagMoELoadDiffusionModel,
    "TagMoEEditConditioning": TagMoEEditConditioning,
    "TagMoEScheduler": TagMoEScheduler,
    "TagMoECFGGuider": TagMoECFGGuider,
    "TagMoECFG": TagMoECFG,
    "TagMoENoise": TagMoENoise,
    "TagMoELoraLoader": TagMoELoraLoader,
    "TagMoETagGuidance": TagMoETagGuidance,
    "TagMoERecordRouting": TagMoERecordRouting,
    "TagMoETextEncodeDiffusers": TagMoETextEncodeDiffusers,
    # the diffusers-folder pipeline (reference-exact)
    "TagMoEModelLoader": TagMoEModelLoader,
    "TagMoETextEncode": TagMoETextEncode,
    "TagMoESampler": TagMoESampler,
    "TagMoEDecode": TagMoEDecode,
    # task intent (both families)
    "TagMoETaskTags": TagMoETaskTags,
    "TagMoEPromptRefine": TagMoEPromptRefine,
    "TagMoERoutingMap": TagMoERoutingMap,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "TagMoELoadDiffusionModel": "TAG-MoE Load Diffusion Model",
    "TagMoEEditConditioning": "TAG-MoE Edit Conditioning",
    "TagMoEScheduler": "TAG-MoE Scheduler",
    "TagMoECFGGuider": "TAG-MoE CFG Guider",
    "TagMoECFG": "TAG-MoE CFG (for KSampler)",
    "TagMoENoise": "TAG-MoE Noise",
    "TagMoELoraLoader": "TAG-MoE LoRA Loader",
    "TagMoETagGuidance": "TAG-MoE Tag Guidance",
    "TagMoERecordRouting": "TAG-MoE Record Routing",
    "TagMoETextEncodeDiffusers": "TAG-MoE Text Encode (diffusers folder)",
    "TagMoEModelLoader": "TAG-MoE Model Loader",
    "TagMoETextEncode": "TAG-MoE Text Encode",
    "TagMoESampler": "TAG-MoE Sampler",
    "TagMoEDecode": "TAG-MoE Decode",
    "TagMoETaskTags": "TAG-MoE Task Tags",
    "TagMoEPromptRefine": "TAG-MoE Prompt Refine",
    "TagMoERoutingMap": "TAG-MoE Routing Map",
}
