"""The TAG-MoE task-tag vocabulary (the release's 18 tags, ids and tiers) and ``TaskTags``.

Annotation rules (the paper's Hierarchical Task Semantic Annotation): exactly one scope; any
number of types and of preservations; style transfer excludes attribute editing; the
"image generation" scope (no reference image) takes no edit types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from .errors import TagMoEError


class Tier(str, Enum):
    SCOPE = "scope"
    TYPE = "type"
    PRESERVATION = "preservation"


# (name, tier) in the release's id order (``TAG_DICT`` of the reference inference code).
_TAGS: tuple[tuple[str, Tier], ...] = (
    ("local editing", Tier.SCOPE),
    ("global editing", Tier.SCOPE),
    ("multi region editing", Tier.SCOPE),
    ("viewpoint editing", Tier.SCOPE),
    ("content customization", Tier.SCOPE),
    ("style customization", Tier.SCOPE),
    ("object editing", Tier.TYPE),
    ("attribute editing", Tier.TYPE),
    ("style transfer", Tier.TYPE),
    ("pose editing", Tier.TYPE),
    ("background editing", Tier.TYPE),
    ("illumination editing", Tier.TYPE),
    ("structure preservation", Tier.PRESERVATION),
    ("background preservation", Tier.PRESERVATION),
    ("identity preservation", Tier.PRESERVATION),
    ("face preservation", Tier.PRESERVATION),
    ("style preservation", Tier.PRESERVATION),
    ("image generation", Tier.SCOPE),  # the scope of text-to-image: no reference image
)

TAG_NAMES: tuple[str, ...] = tuple(name for name, _ in _TAGS)
TAG_IDS: dict[str, int] = {name: i for i, name in enumerate(TAG_NAMES)}
TAG_TIERS: dict[str, Tier] = dict(_TAGS)
NUM_TAGS = len(TAG_NAMES)
IMAGE_GENERATION = "image generation"

# What each tag means, for people (node tooltips, the picker) and for the VLM tagger's prompt.
TAG_DEFINITIONS: dict[str, str] = {
    "local editing": "changes one object or region of the image; the rest stays as it is",
    "global editing": "changes the whole image at once (style, weather, season, time of day, colour grading)",
    "multi region editing": "several separate edits to different objects or regions in one instruction",
    "viewpoint editing": "shows the same scene or subject from another camera angle, distance or view",
    "content customization": "a new image that contains the reference's subject (a person, object, logo) "
                             "in a new scene",
    "style customization": "a new image with new content drawn in the reference image's style",
    "image generation": "a new image from text alone, with no reference image",
    "object editing": "adds, removes or replaces objects",
    "attribute editing": "changes an object's colour, material, texture, size, shape, age or expression",
    "style transfer": "re-renders the image in another artistic style or medium",
    "pose editing": "changes a person's or animal's pose, gesture or body position",
    "background editing": "changes or replaces the background",
    "illumination editing": "changes lighting, shadows, time of day or weather light",
    "structure preservation": "keeps the layout, composition and shapes",
    "background preservation": "keeps the background unchanged",
    "identity preservation": "keeps who or what the subject is recognisable",
    "face preservation": "keeps the face unchanged",
    "style preservation": "keeps the image's look: colours, rendering, medium",
}


def tags_in_tier(tier: Tier) -> tuple[str, ...]:
    return tuple(name for name, t in _TAGS if t is tier)


SCOPES = tags_in_tier(Tier.SCOPE)
TYPES = tags_in_tier(Tier.TYPE)
PRESERVATIONS = tags_in_tier(Tier.PRESERVATION)


class TagError(TagMoEError):
    """Tags that break the annotation rules, or unknown tag names."""


def canonical_tag(name: str) -> str:
    """``'Attribute_Editing'`` / ``'attribute-editing'`` -> ``'attribute editing'`` (or TagError)."""
    key = " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())
    if key in TAG_IDS:
        return key
    raise TagError(f"unknown task tag {name!r}; known tags: {', '.join(TAG_NAMES)}")


@dataclass(frozen=True)
class TaskTags:
    """One scope, any types, any preservations, validated against the annotation rules."""

    scope: str
    types: tuple[str, ...] = ()
    preservations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        scope = canonical_tag(self.scope)
        types = tuple(dict.fromkeys(canonical_tag(t) for t in self.types))
        keeps = tuple(dict.fromkeys(canonical_tag(p) for p in self.preservations))
        for name, tier, label in [(scope, Tier.SCOPE, "scope")] + [(t, Tier.TYPE, "type") for t in types] + \
                [(p, Tier.PRESERVATION, "preservation") for p in keeps]:
            if TAG_TIERS[name] is not tier:
                raise TagError(f"'{name}' is a {TAG_TIERS[name].value} tag, not a {label}")
        if "style transfer" in types and "attribute editing" in types:
            raise TagError("'style transfer' excludes 'attribute editing': a style change is not annotated "
                           "as an attribute edit")
        if scope == IMAGE_GENERATION and types:
            raise TagError(f"'image generation' (no reference image) takes no edit types, got {', '.join(types)}")
        # Keep the release's id order so equal tag sets compare and serialise equal.
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "types", tuple(sorted(types, key=TAG_IDS.__getitem__)))
        object.__setattr__(self, "preservations", tuple(sorted(keeps, key=TAG_IDS.__getitem__)))

    @property
    def names(self) -> tuple[str, ...]:
        return (self.scope,) + self.types + self.preservations

    @property
    def ids(self) -> list[int]:
        return [TAG_IDS[n] for n in self.names]

    # -- text and JSON ------------------------------------------------------------------------------
    def to_text(self) -> str:
        """``'local editing, attribute editing, background preservation, ...'`` (scope first)."""
        return ", ".join(self.names)

    @classmethod
    def from_text(cls, text: str) -> "TaskTags":
        """Comma- or semicolon-separated tag names in any order; the one scope is found by tier."""
        names = [n for n in (p.strip() for p in str(text).replace(";", ",").split(",")) if n]
        return cls.from_names(names)

    @classmethod
    def from_names(cls, names) -> "TaskTags":
        canon = [canonical_tag(n) for n in names]
        scopes = [n for n in canon if TAG_TIERS[n] is Tier.SCOPE]
        if len(scopes) != 1:
            raise TagError(f"exactly one scope tag is needed ({', '.join(SCOPES)}); got "
                           f"{', '.join(scopes) if scopes else 'none'}")
        return cls(scopes[0], tuple(n for n in canon if TAG_TIERS[n] is Tier.TYPE),
                   tuple(n for n in canon if TAG_TIERS[n] is Tier.PRESERVATION))

    def to_dict(self) -> dict:
        return {"scope": self.scope, "type": list(self.types), "preservation": list(self.preservations)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "TaskTags":
        if not isinstance(data, dict):
            raise TagError(f"expected an object with scope/type/preservation, got {type(data).__name__}")
        scope = data.get("scope")
        if isinstance(scope, list):
            if len(scope) != 1:
                raise TagError(f"exactly one scope is needed, got {scope}")
            scope = scope[0]
        if not scope:
            raise TagError("the tags have no scope")
        return cls(scope, tuple(_as_list(data.get("type", data.get("types")))),
                   tuple(_as_list(data.get("preservation", data.get("preservations")))))

    @classmethod
    def from_json(cls, text: str) -> "TaskTags":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise TagError(f"task tags are not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in (p.strip() for p in value.split(",")) if v]
    return [str(v) for v in value]
