"""TAG-MoE Task Tags: scope / types / preservations, picked by hand or tagged from the instruction."""

from __future__ import annotations

from ...tagmoe_core.errors import InputError
from ...tagmoe_core.taxonomy import PRESERVATIONS, SCOPES, TYPES, TagError, TaskTags
from ..conversions import image_batch_to_pil

MODES = ["manual", "auto (rules)", "auto (VLM)"]


class TagMoETaskTags:
    DESCRIPTION = ("Describes the edit with TAG-MoE's task tags: one scope, any edit types, any preservations. "
                   "'auto' reads them off the instruction: 'auto (VLM)' scores every tag with the connected model's "
                   "text encoder (a VLM), 'auto (rules)' - and 'auto (VLM)' without a model - uses the English "
                   "keyword rules. The node shows where the tags came from, how sure the tagger is, and warnings.")
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
                                                                 "instruction (VLM: with the model's text encoder "
                                                                 "when one is connected, else the rules)"}),
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
                "model": ("TAGMOE_MODEL", {"tooltip": "auto (VLM): its text encoder scores the tags"}),
                "image": ("IMAGE", {"tooltip": "auto (VLM): the image the VLM looks at"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def tags(self, mode, scope, tags, edits_an_image=True, instruction=None, model=None, image=None, unique_id=None):
        if mode == "manual":
            try:
                result = TaskTags.from_text(f"{scope}, {tags}")
            except TagError as exc:
                raise InputError(f"task tags: {exc}") from exc
            text = result.to_text()
            return {"ui": {"text": [text], "tags": [result.to_dict()]}, "result": (result, text)}
        if not instruction or not str(instruction).strip():
            raise InputError("auto tagging needs an instruction: connect a STRING to 'instruction'")
        tagged = self._auto(mode, instruction, edits_an_image, model, image)
        text = tagged.tags.to_text()
        return {"ui": {"text": ["\n".join(tagged.report_lines())], "tags": [tagged.tags.to_dict()],
                       "tagging": [tagged.to_dict()]},
                "result": (tagged.tags, text)}

    @staticmethod
    def _auto(mode, instruction, edits_an_image, model, image):
        from ...tagmoe_core.intent.tag_rules import tag_with_rules

        if mode == "auto (rules)":
            return tag_with_rules(instruction, has_image=edits_an_image)
        pipe = model.require() if model is not None else None
        if pipe is None or getattr(pipe, "text_encoder", None) is None:
            result = tag_with_rules(instruction, has_image=edits_an_image)
            result.warnings.insert(0, "auto (VLM) without a model with a text encoder: rule-based tags")
            return result
        from ...tagmoe_core.intent.tag_scoring import TagScorer

        picture = image_batch_to_pil(image)[0] if image is not None and edits_an_image else None
        with pipe.using("text_encoder") as text_encoder:
            scorer = TagScorer(text_encoder, pipe.tokenizer, pipe.vlm_image_processor)
            return scorer.tag(instruction, picture, has_image=edits_an_image)
