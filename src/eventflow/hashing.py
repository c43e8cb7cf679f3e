"""The deterministic request hash: SHA-256 over the tenant and the canonical JSON of the request."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def _normalize(value: Any) -> Any:
    # Integral floats become ints so ``1`` and ``1.0`` hash alike; JSON has one number type.
    # Exact types first: every request is hashed, and its values are plain JSON types (model_dump(mode="json")),
    # for which these answer as the isinstance chain below does (is_integer() is False for inf and nan).
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is dict:
        return {k if type(k) is str else str(k): _normalize(v) for k, v in value.items()}
    if kind is float:
        return int(value) if value.is_integer() else value
    if kind is list:
        return [_normalize(v) for v in value]
    # Subclasses (str enums, int enums) and tuples.
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    raise TypeError(f"cannot canonicalize {type(value).__name__}")


def canonical_json(value: Any) -> str:
    """Key-sorted, whitespace-free JSON in which integral floats are written as integers."""
    return json.dumps(_normalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def request_hash(tenant: str, normalized_request: dict[str, Any]) -> str:
    """Hex SHA-256 of ``tenant`` + NUL + canonical JSON; the NUL keeps tenant and body apart."""
    digest = hashlib.sha256()
    digest.update(tenant.encode())
    digest.update(b"\x00")
    digest.update(canonical_json(normalized_request).encode())
    return digest.hexdigest()
