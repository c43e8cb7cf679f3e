"""Signed bearer tokens ``ef1.<key_id>.<base64url claims>.<base64url HMAC-SHA256>``: minting and verification.

The claims are JSON ``{"tenant": str, "exp": unix seconds, "scope": "read" | "write", "iat": unix seconds}``
(``scope`` defaults to ``write``; unknown claims are ignored so a newer minter does not lock out an older
verifier). The signature covers ``ef1.<key_id>.<claims>``, so neither the version nor the key id can be
swapped. Keys come from ``EVENTFLOW_INGEST__HMAC_KEYS``; naming the key in the token lets several keys be
live at once while one is rotated out.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

#: Version tag and first dot-separated part of every signed token.
PREFIX = "ef1"
#: Longer Authorization values are refused before any decoding (claims are a few dozen bytes).
MAX_TOKEN_CHARS = 2048
#: Tenants appear in Redis keys and request hashes: a conservative, key-safe spelling.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A SHA-256 digest is 32 bytes: 43 base64url characters without padding.
_SHAPE = re.compile(re.escape(PREFIX) + r"\.([A-Za-z0-9_-]{1,32})\.([A-Za-z0-9_-]{1,1800})\.([A-Za-z0-9_-]{43})")


class Scope(StrEnum):
    """What a signed token may do."""

    read = "read"  #: GET and HEAD only: read jobs, never submit or cancel
    write = "write"  #: everything a static token can do (the default)


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified content of a signed token."""

    tenant: str
    #: Expiry, Unix seconds; the token is refused from this second on.
    exp: int
    scope: Scope = Scope.write


class TokenRejected(Exception):
    """A signed token that must not be honoured; ``reason`` is the stable error code sent to the client."""

    reason = "invalid_token"


class MalformedToken(TokenRejected):
    """Not ``ef1.<key_id>.<claims>.<signature>``, or claims that are not what this version signs."""

    reason = "malformed_token"


class UnknownKey(TokenRejected):
    """The key id is not among the configured keys (never issued, or rotated out)."""

    reason = "unknown_key"


class BadSignature(TokenRejected):
    """The signature does not match the named key: forged or altered."""

    reason = "bad_signature"


class TokenExpired(TokenRejected):
    """The ``exp`` claim has passed."""

    reason = "token_expired"


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: str, signing_input: str) -> str:
    return _b64encode(hmac.new(secret.encode(), signing_input.encode("ascii"), hashlib.sha256).digest())


def is_signed(token: str) -> bool:
    """Whether ``token`` claims to be a signed token (as opposed to a static one)."""
    return token.startswith(PREFIX + ".")


def sign(key_id: str, secret: str, claims: Claims, issued_at_s: int | None = None) -> str:
    """The token for ``claims`` signed with ``secret`` under ``key_id``."""
    if not TENANT_PATTERN.fullmatch(claims.tenant):
        raise ValueError(f"tenant {claims.tenant!r} must match {TENANT_PATTERN.pattern}")
    body = {"tenant": claims.tenant, "exp": claims.exp, "scope": str(claims.scope),
            "iat": int(time.time()) if issued_at_s is None else issued_at_s}
    signing_input = f"{PREFIX}.{key_id}.{_b64encode(json.dumps(body, separators=(',', ':')).encode())}"
    return f"{signing_input}.{_signature(secret, signing_input)}"


def mint(keys: Mapping[str, str], key_id: str, tenant: str, ttl_s: int, scope: Scope = Scope.write,
         now_s: int | None = None) -> str:
    """A token for ``tenant`` valid for ``ttl_s`` seconds; UnknownKey if ``key_id`` is not in ``keys``."""
    if key_id not in keys:
        raise UnknownKey(f"key id {key_id!r} is not configured")
    if ttl_s < 1:
        raise ValueError("ttl must be at least 1 second")
    now = int(time.time()) if now_s is None else now_s
    return sign(key_id, keys[key_id], Claims(tenant=tenant, exp=now + ttl_s, scope=scope), issued_at_s=now)


def verify(token: str, keys: Mapping[str, str], now_s: float | None = None) -> Claims:
    """The claims of a valid token; raises a :class:`TokenRejected` subclass saying why not.

    The signature is checked (in constant time) before any claim is read, so nothing from an unsigned
    token influences the answer beyond its shape and key id.
    """
    match = _SHAPE.fullmatch(token) if len(token) <= MAX_TOKEN_CHARS else None
    if match is None:
        raise MalformedToken(f"not a {PREFIX}.<key_id>.<claims>.<signature> token")
    key_id, claims_part, presented = match.groups()
    secret = keys.get(key_id)
    if secret is None:
        raise UnknownKey(f"key id {key_id!r} is not configured")
    expected = _signature(secret, f"{PREFIX}.{key_id}.{claims_part}")
    if not hmac.compare_digest(expected.encode("ascii"), presented.encode("ascii")):
        raise BadSignature(f"signature does not match key {key_id!r}")
    try:
        raw = json.loads(_b64decode(claims_part))
    except (binascii.Error, ValueError):
        raise MalformedToken("claims are not base64url JSON") from None
    if not isinstance(raw, dict):
        raise MalformedToken("claims are not a JSON object")
    tenant, exp, scope = raw.get("tenant"), raw.get("exp"), raw.get("scope", Scope.write.value)
    if not isinstance(tenant, str) or not TENANT_PATTERN.fullmatch(tenant):
        raise MalformedToken("claim 'tenant' is missing or not a tenant name")
    # bool is an int subclass: "exp": true must not read as 1970-01-01T00:00:01.
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise MalformedToken("claim 'exp' is missing or not integer Unix seconds")
    if scope not in Scope.__members__:
        raise MalformedToken(f"claim 'scope' must be one of {', '.join(Scope.__members__)}")
    if (time.time() if now_s is None else now_s) >= exp:
        raise TokenExpired(f"token expired at {exp} (Unix seconds)")
    return Claims(tenant=tenant, exp=exp, scope=Scope(scope))


class VerifiedTokens:
    """Remembers tokens that passed :func:`verify`, so a client's next request skips the HMAC and decoding.

    A token is immutable and signed as a whole, so the same string verifies the same way again against the
    same keys; only expiry depends on the clock, and it is checked on every use. Entries are keyed by the
    token's SHA-256 digest (no secret-dependent comparison on the token itself). Rejected tokens are never
    stored; at ``max_entries`` the memory is dropped and refills from live clients.
    """

    def __init__(self, keys: Mapping[str, str], max_entries: int = 10_000) -> None:
        self.keys = keys
        self.max_entries = max_entries
        self._claims: dict[bytes, Claims] = {}

    def verify(self, token: str, now_s: float | None = None) -> Claims:
        """As :func:`verify` with this object's keys."""
        digest = hashlib.sha256(token.encode()).digest()
        claims = self._claims.get(digest)
        if claims is None:
            claims = verify(token, self.keys, now_s)
            if len(self._claims) >= self.max_entries:
                self._claims.clear()
            self._claims[digest] = claims
        elif (time.time() if now_s is None else now_s) >= claims.exp:
            del self._claims[digest]
            raise TokenExpired(f"token expired at {claims.exp} (Unix seconds)")
        return claims
