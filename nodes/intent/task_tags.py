"""TAG-MoE Task Tags: scope / types / preservations, picked by hand or tagged from the instruction."""

from __future__ import annotations

from ...tagmoe_core.errors import InputError
from ...tagmoe_core.taxonomy import PRESERVATIONS, SCOPES, TYPES, TagError, TaskTags
from ..conversions import image_batch_to_pil

MODES = ["manual", "auto (rules)", "auto (VLM)"]


class TagMoETaskTags:
    DESCRIPTION = ("Describes the edit with TAG-MoE's task tags: one scope, any edit types, any preservations. "
                   "'auto' reads them off the instruction (rules, or the model's VLM with the rules as fallback).")
    CATEGORY = "TAG-MoE"
    FUNCTION = "tags"
    RETURN_TYPES = ("TAGMOE_TAGS", "STRING")
    RETURN_NAMES = ("tags", "tags_text")
    OUTPUT_TOOLTIPS = ("the task tags (for tag guidance and routing analysis)", "the tags as text")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (MODES, {"default": "manual", "tooltip": "manual: the scope and tags below; auto: tag the "
                                                                 "instruction"}),
                "scope": (list(SCOPES), {"default": "local editing", "tooltip": "exactly one scope (manual mode)"}),
                "tags": ("STRING", {"default": "identity preservation, background preservation, style preservation",
                                    "multiline": True,
                                    "tooltip": "edit types and preservations, comma separated (manual mode). Types: "
                                               + ", ".join(TYPES) + ". Preservations: " + ", ".join(PRESERVATIONS)}),
                "edits_an_image": ("BOOLEAN", {"default": True, "tooltip": "off: text-to-image (scope 'image "
                                                                           "generation', auto mode)"}),
            },
            "optional": {
                "instruction": ("STRING", {"forceInput": True, "tooltip": "the instruction to tag (auto modes)"}),
                "model": ("TAGMOE_MODEL", {"tooltip": "auto (VLM): its text encoder answers"}),
                "image": ("IMAGE", {"tooltip": "auto (VLM): the image the VLM looks at"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def tags(self, mode, scope, tags, edits_an_image=True, instruction=None, model=None, image=None, unique_id=None):
        warnings: list[str] = []
        report: list[str] = []
        if mode == "manual":
            try:
                result = TaskTags.from_text(f"{scope}, {tags}")
            except TagError as exc:
                raise InputError(f"task tags: {exc}") from exc
        else:
            if not instruction or not str(instruction).strip():
                raise InputError("auto tagging needs an instruction: connect a STRING to 'instruction'")
            if mode == "auto (rules)":
                from ...tagmoe_core.intent.tag_rules import tag_with_rules

                tagged = tag_with_rules(instruction, has_image=edits_an_image)
                result, warnings, report = tagged.tags, tagged.warnings, tagged.report_lines()[1:2]
            else:
                if model is None:
                    raise InputError("auto (VLM) needs the TAG-MoE model (its text encoder is the VLM)")
                from ...tagmoe_core.intent.refine import TextEncoderVLM, tag_with_vlm

                pipe = model.require()
                picture = image_batch_to_pil(image)[0] if image is not None and edits_an_image else None
                with pipe.using("text_encoder") as text_encoder:
                    tagged = tag_with_vlm(TextEncoderVLM(text_encoder, pipe.tokenizer, pipe.vlm_image_processor),
                                          instruction, picture, has_image=edits_an_image)
                result, warnings, report = tagged.tags, tagged.warnings, tagged.report_lines()[1:2]
        text = result.to_text()
        ui = [text] + report + [f"warning: {w}" for w in warnings]
        return {"ui": {"text": ["\n".join(ui)], "tags": [result.to_dict()]}, "result": (result, text)}
