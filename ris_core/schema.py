"""Type checks for the JSON files the app reads: a file may parse and still hold a list where an object belongs,
or text where a number belongs. `problems` names each such field; callers refuse the file (run files) or drop
the field and say so (evaluation summaries), never crash on it.

A spec maps a key to what its value must be when present: `str`, `int`, `float` (any finite number), `bool`,
`list`, `dict`, `None` (null allowed, as in `(str, None)`), `IDS` (a list of integers) or a nested spec (a
dict, checked recursively). Keys absent from the document are not problems; keys absent from the spec are
not checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

IDS = "ids"  # a list of integer ids
NAMES = {str: "text", int: "a whole number", float: "a number", bool: "true or false", list: "a list",
         dict: "an object", None: "null", IDS: "a list of whole numbers"}


def _is(value: object, kind: object) -> bool:
    if kind is None:
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is IDS:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if isinstance(kind, Mapping):
        return isinstance(value, dict)
    return isinstance(value, kind)  # str, bool, list, dict


def describe(value: object) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(
        type(value), type(value).__name__)


def problems(document: object, spec: Mapping, where: str = "") -> list[str]:
    """One line per field of `document` that does not have the type `spec` asks for."""
    if not isinstance(document, dict):
        return [f"{where or 'the file'} holds {describe(document)}, not an object"]
    found = []
    for key, kind in spec.items():
        if key not in document:
            continue
        value, name = document[key], f"{where}.{key}" if where else key
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not any(_is(value, k) for k in kinds):
            wanted = " or ".join(NAMES.get(k, "an object") if not isinstance(k, Mapping) else "an object"
                                 for k in kinds)
            found.append(f"{name} should be {wanted}, not {describe(value)}")
        elif isinstance(kind, Mapping):
            found += problems(value, kind, name)
    return found


def without_problems(document: dict, spec: Mapping) -> tuple[dict, list[str]]:
    """A copy of `document` with every field of the wrong type removed, and what was removed."""
    found, clean = [], {}
    for key, value in document.items():
        kind = spec.get(key)
        if kind is None and key not in spec:
            clean[key] = value
            continue
        issue = problems({key: value}, {key: kind})
        if issue and not isinstance(kind, Mapping):
            found += issue
        elif isinstance(kind, Mapping):
            if not isinstance(value, dict):
                found += issue
            else:
                clean[key], inner = without_problems(value, kind)
                found += [f"{key}.{line}" for line in inner]
        else:
            clean[key] = value
    return clean, found
