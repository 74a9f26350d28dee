"""JSON from a peer, checked before use: an object of bounded size, and fields of the
type they must be (a bool is not a number).  The store's manifests and the page
server's messages are read through it."""
from __future__ import annotations

import json
from typing import Any

from qfram.errors import FormatError


def json_object(raw: bytes, what: str, limit: int) -> dict:
    """A JSON object, no larger than ``limit`` bytes."""
    if len(raw) > limit:
        raise FormatError(f"{what}: {len(raw)} bytes, more than {limit}")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise FormatError(f"{what}: not JSON") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what}: not a JSON object")
    return obj


def field(obj: dict, key: str, kind, what: str, default: Any = ...) -> Any:
    """``obj[key]``, of type ``kind`` (or ``default`` where it may be missing)."""
    if key not in obj:
        if default is ...:
            raise FormatError(f"{what}: no {key!r}")
        return default
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"{what}: {key!r} is not a {getattr(kind, '__name__', 'value')}")
    return value
