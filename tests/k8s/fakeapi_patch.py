"""Patch arithmetic for the fake API server: JSON merge patch (RFC 7386), JSON patch (RFC 6902),
strategic merge patch, the merge that stands in for server-side apply, and CRD schema defaults.

Strategic merge knows list merge keys by field name (`containers` by `name`, `ports` by
`containerPort` or else `port`, ...), not from Go struct tags; a list field it does not know is
replaced, as JSON merge patch does. The directives kubectl sends (`$patch: replace|delete`,
`$retainKeys`, `$setElementOrder/<f>`, `$deleteFromPrimitiveList/<f>`) are honoured.
"""

from __future__ import annotations

import copy
from typing import Any

# Field name -> merge key candidates (the first one the list's items carry is used).
MERGE_KEYS: dict[str, tuple[str, ...]] = {
    "containers": ("name",),
    "initContainers": ("name",),
    "ephemeralContainers": ("name",),
    "env": ("name",),
    "volumes": ("name",),
    "volumeMounts": ("mountPath",),
    "volumeDevices": ("devicePath",),
    "ports": ("containerPort", "port"),
    "imagePullSecrets": ("name",),
    "conditions": ("type",),
    "hostAliases": ("ip",),
    "topologySpreadConstraints": ("topologyKey",),
    "ownerReferences": ("uid",),
    "resourceClaims": ("name",),
}
MERGED_PRIMITIVE_LISTS = frozenset({"finalizers"})  # merged as sets, not replaced


class PatchError(ValueError):
    """A patch that cannot be applied (the server answers 422 Invalid)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --- JSON patch --------------------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc: Any, tokens: list[str]) -> Any:
    for token in tokens[:-1]:
        doc = _child(doc, token)
    return doc


def _child(doc: Any, token: str) -> Any:
    try:
        return doc[int(token)] if isinstance(doc, list) else doc[token]
    except (KeyError, IndexError, ValueError, TypeError):
        raise PatchError(f"path element {token!r} not found") from None


def _index(container: list, token: str, *, inserting: bool) -> int:
    if token == "-" and inserting:
        return len(container)
    try:
        index = int(token)
    except ValueError:
        raise PatchError(f"bad list index {token!r}") from None
    if not 0 <= index <= len(container) - (0 if inserting else 1):
        raise PatchError(f"list index {index} out of range")
    return index


def _remove(doc: Any, tokens: list[str]) -> Any:
    parent = _parent(doc, tokens)
    if isinstance(parent, list):
        return parent.pop(_index(parent, tokens[-1], inserting=False))
    if not isinstance(parent, dict) or tokens[-1] not in parent:
        raise PatchError(f"cannot remove missing {tokens[-1]!r}")
    return parent.pop(tokens[-1])


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _parent(doc, tokens)
    if isinstance(parent, list):
        parent.insert(_index(parent, tokens[-1], inserting=True), value)
    elif isinstance(parent, dict):
        parent[tokens[-1]] = value
    else:
        raise PatchError(f"cannot add {tokens[-1]!r} to a scalar")
    return doc


def json_patch(target: Any, operations: list[dict]) -> Any:
    """RFC 6902: add, remove, replace, move, copy, test."""
    doc = copy.deepcopy(target)
    for op in operations:
        kind, tokens = op.get("op"), _pointer(op.get("path", ""))
        if kind == "add":
            doc = _add(doc, tokens, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, tokens)
        elif kind == "replace":
            if tokens:
                _remove(doc, tokens)
            doc = _add(doc, tokens, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = _pointer(op["from"])
            value = _remove(doc, source) if kind == "move" else copy.deepcopy(_get(doc, source))
            doc = _add(doc, tokens, value)
        elif kind == "test":
            if _get(doc, tokens) != op.get("value"):
                raise PatchError(f"test failed at {op.get('path')!r}")
        else:
            raise PatchError(f"unknown JSON patch op {kind!r}")
    return doc


def _get(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        doc = _child(doc, token)
    return doc


# --- strategic merge patch ---------------------------------------------------------------------


def strip_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [strip_directives(v) for v in value]
    return copy.deepcopy(value)


def strategic_merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return strip_directives(patch)
    if not isinstance(target, dict) or patch.get("$patch") == "replace":
        return strip_directives(patch)
    result = dict(target)
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [x for x in result.get(field) or [] if x not in value]
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif isinstance(value, dict):
            result[key] = strategic_merge(result.get(key), value)
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, key)
        else:
            result[key] = value
    if "$retainKeys" in patch:
        result = {k: v for k, v in result.items() if k in patch["$retainKeys"]}
    for key, order in patch.items():
        if key.startswith("$setElementOrder/") and isinstance(result.get(key[17:]), list):
            result[key[17:]] = _reorder(result[key[17:]], order, key[17:])
    return result


def _merge_key(field: str, items: list) -> str | None:
    for candidate in MERGE_KEYS.get(field, ()):
        if any(isinstance(i, dict) and candidate in i for i in items):
            return candidate
    return None


def _merge_list(current: Any, patch: list, field: str) -> list:
    current = current if isinstance(current, list) else []
    if {"$patch": "replace"} in patch:
        return strip_directives([i for i in patch if i != {"$patch": "replace"}])
    if field in MERGED_PRIMITIVE_LISTS:
        return current + [x for x in patch if x not in current]
    key = _merge_key(field, patch + current)
    if key is None:
        return strip_directives(patch)
    result = list(current)
    for item in patch:
        at = next((i for i, old in enumerate(result) if old.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            if at is not None:
                result.pop(at)
        elif at is None:
            result.append(strip_directives(item))
        else:
            result[at] = strategic_merge(result[at], item)
    return result


def _reorder(items: list, order: list, field: str) -> list:
    key = _merge_key(field, items)

    def identity(item: Any) -> Any:
        return item.get(key) if key is not None and isinstance(item, dict) else item

    wanted = [identity(o) for o in order]
    ranked = sorted(
        range(len(items)),
        key=lambda i: (
            wanted.index(identity(items[i])) if identity(items[i]) in wanted else len(wanted),
            i,
        ),
    )
    return [items[i] for i in ranked]


def apply_merge(live: dict, applied: dict, last_applied: dict | None, *, is_custom: bool) -> dict:
    """Server-side apply, with field ownership reduced to one rule: what this field manager
    applied last time and no longer applies is removed (as kubectl's client-side three-way
    apply does); the rest of the applied configuration is merged into the live object
    (associative lists by merge key for built-in kinds; lists replaced for custom resources,
    like `x-kubernetes-list-type: atomic`)."""
    pruned = _prune(live, last_applied, applied, None, is_custom) if last_applied else live
    if is_custom:
        return _deep_merge(pruned, applied)
    return strategic_merge(pruned, applied)


def _prune(live: Any, last: Any, new: Any, field: str | None, is_custom: bool) -> Any:
    """live minus what `last` set and `new` no longer sets."""
    if isinstance(live, dict) and isinstance(last, dict) and isinstance(new, dict):
        result = dict(live)
        for key, value in last.items():
            if key not in new:
                result.pop(key, None)
            elif key in result:
                result[key] = _prune(result[key], value, new[key], key, is_custom)
        return result
    if is_custom or field is None or not all(isinstance(x, list) for x in (live, last, new)):
        return live
    key = _merge_key(field, live + last + new)
    if key is None:
        return live
    last_by, new_by = {i.get(key): i for i in last}, {i.get(key): i for i in new}
    return [
        _prune(item, last_by[item.get(key)], new_by[item.get(key)], None, is_custom)
        if item.get(key) in new_by and item.get(key) in last_by
        else item
        for item in live
        if not (item.get(key) in last_by and item.get(key) not in new_by)
    ]


def _deep_merge(target: Any, patch: Any) -> Any:
    if not (isinstance(target, dict) and isinstance(patch, dict)):
        return copy.deepcopy(patch)
    result = dict(target)
    for key, value in patch.items():
        result[key] = _deep_merge(result.get(key), value)
    return result


# --- CRD structural-schema defaults ------------------------------------------------------------


def apply_defaults(schema: dict | None, value: Any) -> Any:
    """Fill `default:`s of an openAPIV3Schema into value (in place), as the API server does."""
    if not schema:
        return value
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name, sub in properties.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                apply_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value.keys() - properties.keys():
                apply_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value
