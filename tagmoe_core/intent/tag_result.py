"""What a tagger returns: the tags, where they came from, and what went wrong."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..taxonomy import TaskTags


@dataclass
class TagResult:
    tags: TaskTags
    source: str  # "rules", "vlm", or "vlm+rules" (the VLM's answer needed fixing)
    warnings: list[str] = field(default_factory=list)
