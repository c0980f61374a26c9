"""Task intent on the native MODEL: tag guidance and routing recording as per-run MODEL patches."""

from __future__ import annotations

from ...tagmoe_core.errors import InputError
from ...tagmoe_core.pipeline.checks import check_number


def _heads(model):
    from ..comfy_model import is_tagmoe, tag_heads

    if not is_tagmoe(model):
        raise InputError("this MODEL is not TAG-MoE: load it with TAG-MoE Load Diffusion Model")
    heads = tag_heads(model)
    if heads is None:
        raise InputError("this TAG-MoE checkpoint has no tag_embedding/router_head, which tag guidance and routing "
                         "analysis need (the TAG-MoE release has them)")
    return heads


class TagMoETagGuidance:
    DESCRIPTION = ("Steers the MoE routers toward the gate distribution that best expresses the task tags "
                   "(adds strength * log g* to every router's logits during sampling). 0 changes nothing.")
    CATEGORY = "TAG-MoE"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "from TAG-MoE Load Diffusion Model"}),
                "tags": ("TAGMOE_TAGS", {"tooltip": "from TAG-MoE Task Tags"}),
                "strength": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.05,
                                       "tooltip": "0 = the release's behaviour; start around 0.5-1"}),
            },
        }

    def patch(self, model, tags, strength):
        from ..comfy_sampling import with_tag_guidance

        strength = check_number("tag guidance strength", strength, minimum=0)
        if not strength:
            return (model,)
        return (with_tag_guidance(model, _heads(model), tags, float(strength)),)


class TagMoERecordRouting:
    DESCRIPTION = ("Records every MoE routing decision of the next sampling run of this model, for TAG-MoE Routing "
                   "Map (connect the decoded image there too, so the map is drawn after the run).")
    CATEGORY = "TAG-MoE"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL", "TAGMOE_ROUTING")
    RETURN_NAMES = ("model", "routing")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "from TAG-MoE Load Diffusion Model"})}}

    def patch(self, model):
        from ...tagmoe_core.intent.routing import RoutingCapture
        from ..comfy_sampling import with_routing_recorder

        capture = RoutingCapture(_heads(model))
        return (with_routing_recorder(model, capture), capture)
