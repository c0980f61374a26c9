"""comfyui-tagmoe: TAG-MoE (task-aware MoE on Qwen-Image) nodes for ComfyUI.

ComfyUI imports this file as a package named after the pack's folder, so every import here
is relative; it also imports without ComfyUI (the nodes then run on plain defaults).
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module: pytest does this to a checkout whose folder name is not a
    # Python identifier (e.g. "comfyui-tagmoe"), since the repository root has this file.
    # There is no package to import the nodes from, and nothing to register.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
