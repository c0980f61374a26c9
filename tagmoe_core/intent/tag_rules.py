"""The rule tagger: task tags read off an English instruction by keyword families.

The rules follow the paper's annotation examples ("Change the cloak to red color" -> local
editing, attribute editing, identity/background/style preservation; "Make the person wear
sunglasses" -> local editing, object editing, identity/background/style preservation) and
extend them by keyword families. They are meant to be predictable, not clever: the VLM tagger
is there for instructions the rules read wrongly. ``tag_with_rules`` is the labelled fallback: it
says so, with low confidence, when the instruction is not English or no rule read a tier.
"""

from __future__ import annotations

import re

from ..taxonomy import IMAGE_GENERATION, TaskTags, Tier
from .language import looks_english
from .tag_result import TagResult, TierConfidence

# The rule tagger's confidence levels (fixed levels, not probabilities).
RULES_READ = 0.7  # a rule read the tier
RULES_DEFAULT = 0.3  # no rule did: the default
RULES_NOT_ENGLISH = 0.1  # the rules read English only


def _words(*items: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(items) + r")\b")


STYLE = _words(r"styles?", r"stylized?", r"watercolou?r", r"oil painting", r"painting", r"painted", r"sketch(?:ed)?",
               r"drawing", r"anime", r"manga", r"cartoon(?:ish)?", r"pixel art", r"van gogh", r"ghibli", r"ukiyo-e",
               r"impressionis[mt]", r"comic(?: book)?", r"3d render", r"claymation", r"pencil", r"charcoal",
               r"vaporwave", r"art deco", r"pop art", r"low poly", r"line art", r"cubis[mt]", r"pastel",
               r"vintage", r"sepia", r"black and white", r"monochrome", r"film look", r"colou?r grad(?:e|ed|ing)")
REFERENCE_STYLE = _words(r"(?:this|that|the same|same|the reference|the image's|this image's|its) (?:art )?style",
                         r"style of (?:this|the|that) (?:image|picture|photo|reference|painting)",
                         r"in this style", r"same look")
GENERATE = _words(r"generate", r"create", r"draw", r"paint", r"design", r"make (?:a|an|me a)", r"produce",
                  r"render (?:a|an)", r"a (?:photo|picture|poster|portrait|image) of", r"show (?:this|the same)")
REFERENCE_SUBJECT = _words(r"(?:this|the same|same) (?:person|man|woman|girl|boy|child|dog|cat|pet|character|"
                           r"product|logo|object|subject|toy|car|bag|shoe|model|face)", r"the subject",
                           r"this (?:one|item)")
NEW_SCENE = _words(r"on (?:a|the) (?:beach|street|mountain|moon|table|mug|shirt|t-shirt|poster|billboard|stage)",
                   r"in (?:a|an|the) (?:forest|city|kitchen|office|park|cafe|desert|garden|studio|room|snow|space)",
                   r"at (?:a|the) (?:beach|park|party|concert|station)", r"new scene", r"different scene",
                   r"printed on", r"as a (?:sticker|poster|figurine|plush)")
VIEWPOINT = _words(r"view(?:point)?", r"angle", r"perspective", r"rotate the (?:camera|view|scene)",
                   r"zoom(?:ed)? (?:in|out)", r"close-?up", r"bird'?s-?eye", r"wide shot",
                   r"(?:turn|rotate|move|tilt|pan) the camera", r"camera (?:angle|view|position)")
# "from the left" is a camera position only when something is shown or seen from there: after
# "remove ... from the left of the table" it says where the thing is, after "light" where it comes from.
VIEW_FROM = re.compile(r"\bfrom (?:the )?(?:side|back|behind|above|below|top|front|left|right|rear)\b"
                       r"(?! (?:side |corner |edge )?of\b)")
SEEING = _words(r"show(?:s|n|ing)?", r"see", r"seen", r"view(?:ed)?", r"shot", r"photograph(?:ed)?", r"film(?:ed)?",
                r"capture[sd]?", r"depict(?:ed)?", r"looking", r"as if")
POSE = _words(r"pose", r"posture", r"raise[sd]?", r"raising", r"wav(?:e|es|ing)", r"sit(?:ting)?(?: down)?",
              r"stand(?:ing)?(?: up)?", r"kneel(?:ing)?", r"jump(?:ing)?", r"arms?", r"hands?", r"crossed", r"lying",
              r"running", r"walking", r"danc(?:e|ing)", r"lean(?:ing)?", r"bend(?:ing)?", r"gesture", r"hung",
              r"turn (?:his|her|its|their) head", r"look(?:ing)? (?:up|down|left|right|at the camera)")
BACKGROUND = _words(r"background", r"backdrop", r"scenery", r"surroundings", r"sky", r"setting")
LIGHT = _words(r"lighting", r"lights", r"lit", r"shadows?", r"sunset", r"sunrise", r"night(?:time)?", r"dusk", r"dawn",
               r"golden hour", r"glow(?:ing)?", r"neon", r"candlelight", r"backlit", r"daytime", r"day time",
               r"twilight", r"moonlight", r"exposure", r"brightness", r"(?:sun|day|moon|warm|cold|soft|hard) ?light")
# "brighter", "darker", "dim" are about light when said of the whole scene, else about an object's colour.
LIGHT_WEAK = _words(r"brighter", r"darker", r"dim(?:mer)?", r"light")
SCENE = _words(r"image", r"photo", r"picture", r"scene", r"room", r"it", r"everything", r"sky")
WEATHER = _words(r"weather", r"sunny", r"rain(?:y|ing)?", r"snow(?:y|ing)?", r"fog(?:gy)?", r"misty", r"stormy",
                 r"cloudy", r"overcast", r"winter", r"summer", r"autumn", r"spring", r"season")
GLOBAL = _words(r"(?:the )?whole (?:image|picture|photo|scene)", r"entire (?:image|picture|photo|scene)",
                r"overall", r"everything", r"colou?r tone")
_LIVING = r"(?:man|woman|boy|girl|person|child|kid|baby|lady|guy|dog|cat|horse|bird|snowman|statue|character)"
OBJECT = _words(r"add(?:s|ed|ing)?", r"draw", r"remove[sd]?", r"removing", r"delete", r"erase", r"get rid of",
                r"take away",
                r"insert", r"put", r"place", r"replace[sd]?", r"swap", r"wear(?:s|ing)?", r"hold(?:s|ing)?",
                r"carry(?:ing)?", r"without the", r"include", r"there (?:is|are)",
                r"give (?:him|her|them|the " + _LIVING + r") (?:a|an|some|the same)")
COLOUR_WORDS = r"(?:red|blue|green|yellow|black|white|pink|purple|orange|brown|gold(?:en)?|silver|gr[ae]y|beige|" \
               r"turquoise)\b"
SHADE = r"(?:light|dark|pale|bright|deep)(?:er)?"  # "dark red", "lighter blue"
# Words for what a thing is made of or how its surface looks: attributes, or (before a noun) a description.
MATERIALS = (r"wooden", r"metal(?:lic)?", r"glass", r"leather", r"marble", r"velvet", r"denim", r"silk", r"shiny",
             r"matte", r"rusty", r"striped")
ATTRIBUTE = _words(r"colou?rs?", r"red", r"blue", r"green", r"yellow", r"black", r"white", r"pink", r"purple",
                   r"orange", r"brown", r"golden", r"gold", r"silver", r"gr[ae]y", r"beige", r"turquoise",
                   r"brighter", r"darker", r"lighter", *MATERIALS,
                   r"bigger", r"smaller", r"larger", r"taller", r"shorter", r"longer", r"thicker", r"thinner",
                   r"older", r"younger", r"smil(?:e|es|ing)", r"sad", r"angry", r"happy", r"texture", r"material",
                   r"polka", r"hair(?:style)?", r"curly", r"straight", r"beard", r"bald", r"tattoo")
# The noun phrase of a thing that is added ("add a red hat", "hold a white umbrella", "swap the mug for a
# glass of orange juice"): its colour or material describes the new thing, not an attribute edit.
ADDED = re.compile(r"\b(?:add(?:s|ed|ing)?|insert|put|place|draw|wear(?:s|ing)?|hold(?:s|ing)?|carry(?:ing)?|"
                   r"give (?:him|her|them|the \w+)|(?:swap|exchange)\b[^,;]*?\bfor)"
                   r"\s+(?:a|an|some|another|one|two|three|the same)\b[^,;]*?"
                   r"(?=\s+(?:to|on|onto|in|into|at|next|beside|near|around|over|under|behind|between|from|and)\b"
                   r"|[,;]|$)")
# The noun phrase of a thing that is removed ("remove the red car", "get rid of the green square"): the
# colour or material words that describe it (DESCRIBING: before its noun) say which thing goes, not an
# attribute edit; a colour or texture that is itself removed ("remove the red colour", "remove all the
# red", "remove his beard") still is one. The phrase ends where a place or another clause begins.
REMOVED = re.compile(r"\b(?:remove[sd]?|removing|delete|erase|get rid of|take away|without)"
                     r"\s+(?:the|a|an|all|every|this|that|these|those|his|her|their|its)\b[^,;]*?"
                     r"(?=\s+(?:from|in|on|at|next|beside|near|around|over|under|behind|between|and|to|so|while|"
                     r"whilst|which|who|as|until|because|making|leaving|turning)\b|[,;]|$)")
DESCRIBING = re.compile(r"\b(?:(?:" + SHADE + r"\s+)?" + COLOUR_WORDS + "|" + "|".join(MATERIALS) + r")\b(?=\s+\w)")
# A body part named as the place of a new thing ("add a balloon to the girl's hand") is not a pose.
POSE_PLACE = re.compile(r"\b(?:to|on|onto|in|into|around|at)\s+(?:the\s+)?(?:\w+'s\s+|his\s+|her\s+|their\s+|its\s+)?"
                        r"(?:left\s+|right\s+)?(?:hands?|arms?|fingers?|wrists?|legs?|feet|foot|neck|head)\b")
_EDIT_VERBS = (r"change", r"make", r"turn", r"add", r"remove", r"replace", r"put", r"place", r"let", r"give",
               r"recolou?r", r"paint", r"convert", r"transform", r"delete", r"erase", r"swap", r"set")
EDIT_VERB = _words(*_EDIT_VERBS)
PERSON = _words(r"person", r"man", r"woman", r"girl", r"boy", r"child", r"kid", r"people", r"he", r"she", r"his",
                r"her", r"lady", r"guy", r"face", r"portrait")
_KEEP_VERB = (r"(?:keep|keeping|preserve|preserving|maintain|maintaining|retain|retaining|leave|leaving|"
              r"don'?t (?:change|touch|alter)|do not (?:change|touch|alter)|without (?:changing|altering))")
# A clause that says what stays is not an edit: it opens with a keep verb ("keep the same view",
# "preserving the pose") or with "same" ("same style"), or ends by saying its thing stays ("everything
# else the same", "the background stays unchanged"). "The same" inside an edit ("the same colour as the
# house", "in the same style") keeps nothing.
KEEP_CLAUSE = re.compile(r"^(?:(?:and|but|while|whilst|please|also)\s+)*(?:" + _KEEP_VERB + r"|same)\b"
                         r"|\b(?:the same|unchanged|untouched|as (?:it is|they are|before))$")
KEEP_TARGETS = (
    (_words(r"backgrounds?", r"scene", r"surroundings"), "background preservation"),
    (_words(r"faces?", r"facial"), "face preservation"),
    (_words(r"identity", r"person", r"character", r"subject", r"who"), "identity preservation"),
    (_words(r"style", r"look", r"colou?rs", r"rendering"), "style preservation"),
    (_words(r"layout", r"composition", r"structure", r"shapes?", r"pose", r"position", r"view(?:point)?",
            r"(?:camera )?angle", r"perspective", r"framing", r"camera"), "structure preservation"),
)


def _clauses(text: str) -> list[str]:
    verbs = "|".join(_EDIT_VERBS + (_KEEP_VERB,))
    parts = re.split(r"[;.]|,\s*(?:and\s+|but\s+)?|\s+(?:and|but|while|whilst)\s+(?=(?:" + verbs + r")\b)"
                     r"|\s+(?=(?:keeping|preserving|maintaining|retaining|without (?:changing|altering))\b)"
                     r"|\s+then\s+", text)
    return [p.strip() for p in parts if p and p.strip()]


# A clause that opens with an edit verb on "it" / "them" goes on with the previous edit ("change the
# shirt to red, make it striped"); so does one with no verb of its own ("..., bright red", "..., with
# grey hair"), unless it names a thing of its own that changes ("..., the girl's hands hung at her sides").
LEADING_VERB = re.compile(r"^(?:(?:and|also|then|please|now)\s+)*(?:" + "|".join(_EDIT_VERBS) + r")\b")
SAME_THING = re.compile(r"^(?:(?:and|also|then|please|now)\s+)*\w+\s+(?:it|them|this|that|one)\b")
OWN_SUBJECT = re.compile(r"^(?:the|her|his|their|its|my)\s+(?!one\b|same\b|rest\b)\w")


def _separate_edits(clauses: list[str], types_in) -> int:
    """How many separate edits the clauses hold (2 or more: multi region editing)."""
    count = 0
    for clause in clauses:
        if not (EDIT_VERB.search(clause) or types_in(clause)):
            continue
        if count == 0:
            count = 1
        elif LEADING_VERB.search(clause):
            count += 0 if SAME_THING.search(clause) else 1
        elif OWN_SUBJECT.search(clause) and types_in(clause):
            count += 1
    return count


def _explicit_keeps(keep_clauses: list[str]) -> set[str]:
    return {tag for clause in keep_clauses for pattern, tag in KEEP_TARGETS if pattern.search(clause)}


def rule_tags(instruction: str, has_image: bool = True) -> TaskTags:
    """Deterministic tags for an English instruction (``has_image`` False: text-to-image)."""
    if not has_image:
        return TaskTags(IMAGE_GENERATION)
    return _read(instruction)[0]


def tag_with_rules(instruction: str, has_image: bool = True) -> TagResult:
    """The rule tagger as a labelled fallback: its tags, with a warning and low confidence where the
    instruction is not English or no rule read a tier (never a confident guess)."""
    if not has_image:
        return TagResult(TaskTags(IMAGE_GENERATION), "rules", TierConfidence.uniform(1.0))
    tags, read = _read(instruction)
    if not looks_english(instruction):
        return TagResult(tags, "rules", TierConfidence.uniform(RULES_NOT_ENGLISH), [
            "the instruction does not look like English and the rule tagger reads English only: these tags are a "
            "guess (the VLM scorer, with a model's text encoder, reads other languages)"])
    confidence = TierConfidence(*(RULES_READ if tier in read else RULES_DEFAULT for tier in Tier))
    missing = [tier.value for tier in Tier if tier not in read]
    warnings = [f"no rule read the {' and '.join(missing)} of this instruction: the rules' default guess, "
                f"low confidence"] if missing else []
    return TagResult(tags, "rules", confidence, warnings)


def _read(instruction: str) -> tuple[TaskTags, set[Tier]]:
    """The tags, and the tiers a rule read (the others are defaults)."""
    text = " ".join(str(instruction).lower().split())
    clauses = _clauses(text)
    keeps = _explicit_keeps([c for c in clauses if KEEP_CLAUSE.search(c)])
    # Clauses that say what to keep are not edits ("keep the same view, change the shirt to blue").
    edit_text = ", ".join(c for c in clauses if not KEEP_CLAUSE.search(c))

    def types_in(t: str) -> set[str]:
        found: set[str] = set()
        if STYLE.search(t):
            found.add("style transfer")
        if POSE.search(POSE_PLACE.sub(" ", t)):
            found.add("pose editing")
        if BACKGROUND.search(t):
            found.add("background editing")
        colourless = re.sub(r"\b" + SHADE + " (?=" + COLOUR_WORDS + r")", "", t)
        if LIGHT.search(colourless) or WEATHER.search(colourless) or \
                (LIGHT_WEAK.search(colourless) and SCENE.search(colourless)):
            found.add("illumination editing")
        verbs = {m.group(0).split()[0] for m in OBJECT.finditer(t)}
        placing = {"put", "place", "replace", "replaced", "replaces", "swap"}
        if verbs and not ("background editing" in found and verbs <= placing) \
                and not ("illumination editing" in found and verbs <= {"add", "adds", "added", "adding"}):
            found.add("object editing")  # but "put her in front of a new background", "add sunset light" are not
        swapped = re.search(r"\b(?:replace[sd]?|swap)\b.*\bwith\b", t)  # "replace the cat with a golden retriever"
        described = REMOVED.sub(lambda m: DESCRIBING.sub("", m.group(0)), ADDED.sub(" ", t))
        if "illumination editing" in found:
            described = LIGHT_WEAK.sub("", described)  # "make the room darker"
        if ATTRIBUTE.search(described) and "style transfer" not in found and not swapped:
            found.add("attribute editing")
        if not found and re.search(r"\b(?:change|turn|make)\b.*\b(?:into|to|a|an)\b", t):
            found.add("object editing")  # "turn the cat into a dog": an object becomes another
        return found

    types = types_in(edit_text)
    every = set(Tier)
    if REFERENCE_STYLE.search(edit_text) and GENERATE.search(edit_text):
        return TaskTags("style customization", (), tuple(keeps | {"style preservation"})), every
    if REFERENCE_SUBJECT.search(edit_text) and (NEW_SCENE.search(edit_text) or GENERATE.search(edit_text)):
        keep = {"identity preservation"} | ({"face preservation"} if PERSON.search(text) else set())
        return TaskTags("content customization", (), tuple(keeps | keep)), every
    seen_from = VIEW_FROM.search(edit_text) and SEEING.search(edit_text)
    if (VIEWPOINT.search(edit_text) or seen_from) and not STYLE.search(edit_text):
        return TaskTags("viewpoint editing", (), tuple(keeps | {"identity preservation", "style preservation"})), \
            every

    if _separate_edits(_clauses(edit_text), types_in) >= 2:
        scope = "multi region editing"
    elif "style transfer" in types or GLOBAL.search(edit_text) or \
            ("illumination editing" in types and "object editing" not in types):
        scope = "global editing"
    else:
        scope = "local editing"

    read = ({Tier.TYPE} if types else set()) | ({Tier.SCOPE, Tier.PRESERVATION}
                                                 if types or scope != "local editing" else set())
    if not types:
        types = {"attribute editing"} if scope == "local editing" else set()
    if "style transfer" in types:
        types.discard("attribute editing")
        keep = {"structure preservation", "identity preservation"}
    elif scope == "global editing":
        keep = {"structure preservation", "identity preservation"}
    elif "background editing" in types and len(types) == 1:
        keep = {"identity preservation", "style preservation"}
    else:
        keep = {"identity preservation", "background preservation", "style preservation"}
        if "background editing" in types:
            keep.discard("background preservation")
    return TaskTags(scope, tuple(types), tuple(keep | keeps)), read
