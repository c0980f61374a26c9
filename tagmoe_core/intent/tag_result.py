"""What a tagger returns: the tags, which tagger made them, how sure it is per tier, and what went wrong."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..taxonomy import TaskTags

SOURCES = ("rules", "vlm")


@dataclass(frozen=True)
class TierConfidence:
    """How sure the tagger is of each tier, 0..1. The VLM scorer's figures are probabilities (of the
    chosen scope; of the chosen type and preservation sets); the rule tagger's are fixed levels that
    say whether a rule read the tier, or it is a default, or the instruction is not English."""

    scope: float
    type: float
    preservation: float

    def __post_init__(self) -> None:
        for name in ("scope", "type", "preservation"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} confidence must lie in 0..1, got {value}")
            object.__setattr__(self, name, value)

    @classmethod
    def uniform(cls, value: float) -> "TierConfidence":
        return cls(value, value, value)

    def to_dict(self) -> dict[str, float]:
        return {"scope": self.scope, "type": self.type, "preservation": self.preservation}

    def to_text(self) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in self.to_dict().items())


@dataclass
class TagResult:
    tags: TaskTags
    source: str  # "rules" or "vlm" (the VLM decided; warnings say what the rules had to fill in)
    confidence: TierConfidence
    warnings: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # the VLM scorer's probability of each tag option

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}")

    def to_dict(self) -> dict:
        return {"tags": self.tags.to_dict(), "source": self.source, "confidence": self.confidence.to_dict(),
                "warnings": list(self.warnings)}

    def report_lines(self) -> list[str]:
        """The tags, then where they came from and how sure, then one line per warning."""
        return [self.tags.to_text(), f"source: {self.source}; confidence: {self.confidence.to_text()}"] + \
            [f"warning: {w}" for w in self.warnings]
