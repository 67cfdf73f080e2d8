"""Label and field selectors, as the API server reads `?labelSelector=` and `?fieldSelector=`.

Labels: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, comma-separated.
Fields: `path=v`, `path==v`, `path!=v` on any dotted path (`metadata.name`, `status.phase`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Predicate = Callable[[dict], bool]

_SET_RE = re.compile(r"^([^\s!=]+)\s+(in|notin)\s+\((.*)\)$")
_EQ_RE = re.compile(r"^([^\s!=]+)\s*(==|=|!=)\s*(.*)$")


class SelectorError(ValueError):
    pass


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(selector[start:i])
            start = i + 1
    parts.append(selector[start:])
    return [p.strip() for p in parts if p.strip()]


def _label_requirement(text: str) -> Predicate:
    if match := _SET_RE.match(text):
        key, op, values = match[1], match[2], {v.strip() for v in match[3].split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQ_RE.match(text):
        key, op, value = match[1], match[2], match[3].strip()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if text.startswith("!"):
        return lambda labels: text[1:].strip() not in labels
    if re.fullmatch(r"[\w./-]+", text):
        return lambda labels: text in labels
    raise SelectorError(f"unable to parse requirement: {text!r}")


def label_selector(selector: str | None) -> Predicate:
    """A predicate over whole objects (reads metadata.labels)."""
    requirements = [_label_requirement(r) for r in _split(selector or "")]

    def matches(obj: dict) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(r(labels) for r in requirements)

    return matches


def _field(obj: dict, path: str) -> str:
    value: object = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    return str(value).lower() if isinstance(value, bool) else str(value)


def field_selector(selector: str | None) -> Predicate:
    requirements = []
    for text in _split(selector or ""):
        match = _EQ_RE.match(text)
        if match is None:
            raise SelectorError(f"invalid field selector: {text!r}")
        requirements.append((match[1], match[2] == "!=", match[3].strip()))

    def matches(obj: dict) -> bool:
        return all((_field(obj, path) == value) != negated for path, negated, value in requirements)

    return matches


def label_selector_string(selector: dict | None) -> str:
    """A LabelSelector object (`matchLabels`, `matchExpressions`) as its string form."""
    if not selector:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op in ("In", "NotIn"):
            parts.append(f"{key} {op.lower()} ({','.join(values)})")
        else:
            parts.append(key if op == "Exists" else f"!{key}")
    return ",".join(parts)
