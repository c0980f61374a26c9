"""Scoring a tagger against a table of instructions with gold tags (``tests/data/tag_eval.jsonl``).

Per tier: micro precision / recall / F1 over tag instances (for the scope tier, where every row
has exactly one gold and one predicted tag, all three equal the scope accuracy); over rows: scope
accuracy and exact-set accuracy (all three tiers right). Precision is undefined (NaN; None in
``as_dict``) for a tier where nothing was predicted, recall where nothing was to be found.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..taxonomy import TagError, TaskTags, Tier

TIERS = (Tier.SCOPE, Tier.TYPE, Tier.PRESERVATION)


@dataclass(frozen=True)
class EvalRow:
    instruction: str
    lang: str
    has_image: bool
    gold: TaskTags

    @property
    def english(self) -> bool:
        return self.lang == "en"


def load_eval_table(path: str | os.PathLike) -> list[EvalRow]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            data = json.loads(line)
            try:
                gold = TaskTags(data["scope"], tuple(data["types"]), tuple(data["preservations"]))
                rows.append(EvalRow(data["instruction"], data["lang"], bool(data["image"]), gold))
            except (KeyError, TypeError, TagError) as exc:
                raise ValueError(f"{path}:{number}: bad row ({exc})") from exc
    return rows


def tier_names(tags: TaskTags, tier: Tier) -> set[str]:
    if tier is Tier.SCOPE:
        return {tags.scope}
    return set(tags.types if tier is Tier.TYPE else tags.preservations)


@dataclass
class TierScore:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def precision(self) -> float:
        """NaN when nothing was predicted (undefined, not perfect)."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else math.nan


@dataclass
class EvalReport:
    rows: int = 0
    scope_right: int = 0
    exact_right: int = 0
    tiers: dict[Tier, TierScore] = field(default_factory=lambda: {t: TierScore() for t in TIERS})
    misses: list[tuple[EvalRow, TaskTags]] = field(default_factory=list)

    @property
    def scope_accuracy(self) -> float:
        return self.scope_right / self.rows if self.rows else 0.0

    @property
    def exact_accuracy(self) -> float:
        return self.exact_right / self.rows if self.rows else 0.0

    def as_dict(self) -> dict:
        return {"rows": self.rows, "scope_accuracy": self.scope_accuracy, "exact_accuracy": self.exact_accuracy,
                **{tier.value: {k: None if math.isnan(v) else v
                                for k, v in (("precision", s.precision), ("recall", s.recall), ("f1", s.f1))}
                   for tier, s in self.tiers.items()}}


def evaluate(rows: Iterable[EvalRow], tagger: Callable[[str, bool], TaskTags]) -> EvalReport:
    """Score ``tagger(instruction, has_image) -> TaskTags`` on ``rows``."""
    report = EvalReport()
    for row in rows:
        predicted = tagger(row.instruction, row.has_image)
        report.rows += 1
        report.scope_right += predicted.scope == row.gold.scope
        report.exact_right += predicted == row.gold
        if predicted != row.gold:
            report.misses.append((row, predicted))
        for tier in TIERS:
            gold, got = tier_names(row.gold, tier), tier_names(predicted, tier)
            score = report.tiers[tier]
            score.tp += len(gold & got)
            score.fp += len(got - gold)
            score.fn += len(gold - got)
    return report
