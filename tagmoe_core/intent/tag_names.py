"""Tag names the way VLMs write them, mapped to the vocabulary's names: ids (7, "7"), short names
("local", "attribute", "bg preservation"), Chinese names ("局部编辑", "背景保持"), loose spelling
("Attribute-Edit", "style customisation"). Short names are read in the tier they are listed under:
"style" is style transfer among the types, style preservation among the preservations."""

from __future__ import annotations

import re

from ..taxonomy import NUM_TAGS, TAG_IDS, TAG_NAMES, TAG_TIERS, TagError, Tier

_ZH_EDITS = {
    "local editing": ("局部编辑", "局部修改"), "global editing": ("全局编辑", "整体编辑", "全局修改"),
    "multi region editing": ("多区域编辑", "多区域修改", "多处编辑"), "viewpoint editing": ("视角编辑", "视点编辑"),
    "content customization": ("内容定制", "内容自定义"), "style customization": ("风格定制", "风格自定义"),
    "image generation": ("图像生成", "图片生成", "文生图"),
    "object editing": ("物体编辑", "对象编辑", "目标编辑"), "attribute editing": ("属性编辑",),
    "style transfer": ("风格迁移", "风格转换", "风格转移"), "pose editing": ("姿态编辑", "姿势编辑", "动作编辑"),
    "background editing": ("背景编辑", "背景替换"), "illumination editing": ("光照编辑", "光影编辑", "照明编辑"),
}
_ZH_KEEPS = {"structure preservation": ("结构",), "background preservation": ("背景",),
             "identity preservation": ("身份",), "face preservation": ("面部", "人脸", "脸部"),
             "style preservation": ("风格",)}
CHINESE: dict[str, str] = {alias: name for name, aliases in _ZH_EDITS.items() for alias in aliases}
CHINESE |= {stem + verb: name for name, stems in _ZH_KEEPS.items() for stem in stems
            for verb in ("保持", "保留", "保存", "不变", "一致")}

# The word that names a tag's tier kind, dropped in short names ("local", "style", "identity").
_KIND = re.compile(r"\s+(?:editing|edit|edits|preservation|preserved|customization|transfer)$")
SHORT: dict[Tier, dict[str, str]] = {tier: {} for tier in Tier}
for _name in TAG_NAMES:
    SHORT[TAG_TIERS[_name]][_KIND.sub("", _name)] = _name
SHORT[Tier.SCOPE] |= {"multi": "multi region editing", "multiple regions": "multi region editing",
                      "multi regions": "multi region editing", "view": "viewpoint editing",
                      "camera": "viewpoint editing", "generation": "image generation",
                      "text to image": "image generation", "t2i": "image generation"}
SHORT[Tier.TYPE] |= {"lighting": "illumination editing", "light": "illumination editing",
                     "relighting": "illumination editing"}
SHORT[Tier.SCOPE] |= {"局部": "local editing", "全局": "global editing", "整体": "global editing",
                      "多区域": "multi region editing", "视角": "viewpoint editing"}
SHORT[Tier.TYPE] |= {"物体": "object editing", "对象": "object editing", "属性": "attribute editing",
                     "风格": "style transfer", "姿态": "pose editing", "姿势": "pose editing",
                     "背景": "background editing", "光照": "illumination editing"}
SHORT[Tier.PRESERVATION] |= {stem: name for name, stems in _ZH_KEEPS.items() for stem in stems}
_SPELLING = ((re.compile(r"\bbg\b"), "background"), (re.compile(r"\bid\b"), "identity"),
             (re.compile(r"customi[sz]ation"), "customization"), (re.compile(r"\bmulti\s*region"), "multi region"),
             (re.compile(r"\bview\s*point"), "viewpoint"), (re.compile(r"^(?:keep|preserve)\s+(.+)$"),
                                                               r"\1 preservation"))


def _normalised(text: str) -> str:
    key = " ".join(re.sub(r"[_\-/]", " ", text.strip().lower()).split()).strip(" .:;'\"")
    for pattern, replacement in _SPELLING:
        key = pattern.sub(replacement, key)
    return key


def resolve_tag(raw, tier: Tier | None = None) -> str:
    """The vocabulary name for ``raw`` (a name, short name, Chinese name or id); ``tier`` is the tier
    it was listed under, which settles short names. Unknown or ambiguous: TagError."""
    if isinstance(raw, bool):
        raise TagError(f"unknown task tag {raw!r}")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    text = str(raw).strip()
    if re.fullmatch(r"#?\d{1,2}", text):
        number = int(text.lstrip("#"))
        if number < NUM_TAGS:
            return TAG_NAMES[number]
        raise TagError(f"tag id {number} is out of range (0..{NUM_TAGS - 1})")
    compact = re.sub(r"\s+", "", text)
    if compact in CHINESE:
        return CHINESE[compact]
    key = _normalised(text)
    if key in TAG_IDS:
        return key
    edited = _KIND.sub("", key)
    tiers = [tier] if tier is not None else []
    for group in (tiers, [t for t in Tier if t is not tier]):
        found = {SHORT[t][k] for t in group for k in (key, edited) if k in SHORT[t]}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            raise TagError(f"task tag {text!r} is ambiguous ({', '.join(sorted(found))})")
    raise TagError(f"unknown task tag {text!r}; known tags: {', '.join(TAG_NAMES)}")
