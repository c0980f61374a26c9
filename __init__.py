"""comfyui-tagmoe: TAG-MoE (task-aware MoE on Qwen-Image) nodes for ComfyUI.

ComfyUI imports this file as a package named after the pack's folder, so every import here
is relative; it also imports without ComfyUI (the nodes then run on plain defaults).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
