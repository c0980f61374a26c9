"""TAG-MoE Routing Map: where each expert worked, and what the routing says about the task."""

from __future__ import annotations

from ...tagmoe_core.errors import InputError
from ..conversions import image_batch_to_pil, pil_to_image_batch


class TagMoERoutingMap:
    DESCRIPTION = ("Per-expert spatial maps of a recorded sampling run (target and condition tokens), and a "
                   "report: the routing signature g, how well router_head(g) matches the task tags, and the tags "
                   "the router's behaviour points to. Turn on record_routing in the sampler.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("maps", "report")
    OUTPUT_TOOLTIPS = ("expert maps (rows: target, condition; columns: experts, then the top expert)",
                       "routing report")
    OUTPUT_NODE = False

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "routing": ("TAGMOE_ROUTING", {"tooltip": "from TAG-MoE Sampler with record_routing on, or from "
                                                          "TAG-MoE Record Routing"}),
                "layers": ("STRING", {"default": "all", "tooltip": "MoE blocks to include: 'all', '59', '50-59'"}),
                "steps": ("STRING", {"default": "all", "tooltip": "denoising steps to include: 'all', '0-9', '-1'"}),
            },
            "optional": {
                "model": ("TAGMOE_MODEL", {"tooltip": "with the TAG-MoE Sampler's routing: the model that made the run "
                                                      "(its router_head and tag embeddings interpret the routing)"}),
                "image": ("IMAGE", {"tooltip": "drawn under the target maps (e.g. the decoded result)"}),
                "condition_image": ("IMAGE", {"tooltip": "drawn under the condition maps (the input image)"}),
                "tags": ("TAGMOE_TAGS", {"tooltip": "the intended task, for the alignment score"}),
            },
        }

    def render(self, routing, layers="all", steps="all", model=None, image=None, condition_image=None, tags=None):
        from ...tagmoe_core.intent.routing import RoutingCapture, analyse
        from ...tagmoe_core.intent.routing_maps import parse_selection, render_expert_maps

        heads = None
        if isinstance(routing, RoutingCapture):
            heads, routing = routing.heads, routing.recording
            if routing is None:
                raise InputError("nothing recorded yet: sample with the MODEL from TAG-MoE Record Routing first, and "
                                 "connect the decoded image here so this node runs after the sampler")
        elif routing is None or not getattr(routing, "records", None):
            raise InputError("no routing was recorded: turn on record_routing in the TAG-MoE Sampler")
        if heads is None:
            if model is None:
                raise InputError("connect the TAG-MoE model that made this run (its router_head reads the routing)")
            heads = model.require().transformer
        chosen_layers = parse_selection(layers, routing.layers, "layers")
        chosen_steps = parse_selection(steps, list(range(routing.steps)), "steps")
        target = image_batch_to_pil(image)[0] if image is not None else None
        condition = image_batch_to_pil(condition_image)[0] if condition_image is not None else None
        picture = render_expert_maps(routing, chosen_layers, chosen_steps, target, condition)
        report = analyse(routing, heads, tags, chosen_layers, chosen_steps).report()
        return {"ui": {"text": [report]}, "result": (pil_to_image_batch([picture]), report)}
