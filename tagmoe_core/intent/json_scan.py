"""JSON objects in a model's free-form answer, in one linear pass.

Tolerates prose, code fences, stray braces and apostrophes around the objects, and inside them
single quotes, trailing commas and Python literals. Strings are tracked only inside braces: double
quotes as JSON has them (a newline ends a broken one), single quotes only where a JSON string could
start (after ``{ [ , :``) and end (before ``: , } ]``), so "the girl's hat" opens none. Every
balanced ``{...}`` is found with a stack in one pass; the outermost ones are parsed, and where one
does not parse, the objects directly inside it. Each character is parsed at most twice, so hostile
input (thousands of ``{``) costs linear time.
"""

from __future__ import annotations

import json
import re

_LOOK = 32  # how far the single-quote test looks around a quote


def _brace_spans(text: str) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    stack: list[int] = []
    quote = ""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == "\n" or (ch == quote and (quote == '"' or _closes_single(text, i))):
                quote = ""
        elif ch == '"' and stack:
            quote = '"'
        elif ch == "'" and stack and _opens_single(text, i):
            quote = "'"
        elif ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            spans.append((stack.pop(), i + 1))
        i += 1
    return spans


def _opens_single(text: str, i: int) -> bool:
    before = text[max(0, i - _LOOK): i].rstrip()
    return bool(before) and before[-1] in "{[,:"


def _closes_single(text: str, i: int) -> bool:
    after = text[i + 1: i + 1 + _LOOK].lstrip()
    return not after or after[0] in ":,}]"


def _parse(text: str) -> dict | None:
    for attempt in (text, _loosen(text)):
        try:
            value = json.loads(attempt)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _loosen(text: str) -> str:
    text = re.sub(r",\s*([}\]])", r"\1", text)  # trailing commas
    text = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", text)))
    return _requote(text) if "'" in text else text


def _requote(text: str) -> str:
    """Single-quoted strings (where a JSON string could start and end) as double-quoted ones."""
    out: list[str] = []
    i, n, quote = 0, len(text), ""
    while i < n:
        ch = text[i]
        if quote == '"':
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                quote = ""
        elif quote == "'":
            if ch == "\\" and i + 1 < n:
                out.append("'" if text[i + 1] == "'" else ch + text[i + 1])
                i += 1
            elif ch == "'" and _closes_single(text, i):
                out.append('"')
                quote = ""
            else:
                out.append('\\"' if ch == '"' else ch)
        elif ch == '"':
            out.append(ch)
            quote = '"'
        elif ch == "'" and _opens_single(text, i):
            out.append('"')
            quote = "'"
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def json_objects(text: str) -> list[dict]:
    """Every JSON object in ``text`` that parses, in the order they end."""
    if not text:
        return []
    tops: list[tuple[int, int, list[tuple[int, int]]]] = []  # outermost spans with their direct children
    for start, end in sorted(_brace_spans(text)):
        if tops and start < tops[-1][1]:
            children = tops[-1][2]
            if not children or start >= children[-1][1]:
                children.append((start, end))
        else:
            tops.append((start, end, []))
    found: list[tuple[int, dict]] = []
    for start, end, children in tops:
        value = _parse(text[start:end])
        if value is not None:
            found.append((end, value))
            continue
        for child_start, child_end in children:
            value = _parse(text[child_start:child_end])
            if value is not None:
                found.append((child_end, value))
    return [value for _, value in sorted(found, key=lambda item: item[0])]


def extract_json_object(text: str) -> dict | None:
    """The last JSON object in a model's answer (an answer that echoes an example puts its own last)."""
    objects = json_objects(text)
    return objects[-1] if objects else None
