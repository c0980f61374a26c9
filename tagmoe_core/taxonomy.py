"""The TAG-MoE task-tag vocabulary: the release's 18 tags, their ids and tiers."""

from __future__ import annotations

from enum import Enum


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


def tags_in_tier(tier: Tier) -> tuple[str, ...]:
    return tuple(name for name, t in _TAGS if t is tier)
