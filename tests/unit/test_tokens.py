"""Signed bearer tokens: round trip, every rejection by its reason, and the `eventflow token` command."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventflow import tokens
from eventflow.cli import main
from eventflow.tokens import Claims, Scope

KEYS = {"k1": "a" * 32, "k2": "b" * 40}
NOW = 1_800_000_000


def test_round_trip_keeps_tenant_expiry_and_scope() -> None:
    token = tokens.mint(KEYS, "k2", "acme", 60, Scope.read, now_s=NOW)
    assert token.startswith("ef1.k2.")
    assert tokens.verify(token, KEYS, now_s=NOW + 59) == Claims(tenant="acme", exp=NOW + 60, scope=Scope.read)


def test_expiry_is_exclusive() -> None:
    token = tokens.mint(KEYS, "k1", "acme", 60, now_s=NOW)
    with pytest.raises(tokens.TokenExpired):
        tokens.verify(token, KEYS, now_s=NOW + 60)


def test_unknown_key_and_rotated_out_key() -> None:
    token = tokens.mint(KEYS, "k1", "acme", 60, now_s=NOW)
    with pytest.raises(tokens.UnknownKey):
        tokens.verify(token, {"k2": KEYS["k2"]}, now_s=NOW)
    with pytest.raises(tokens.UnknownKey):
        tokens.mint(KEYS, "k3", "acme", 60)


def test_same_key_id_other_secret_is_a_bad_signature() -> None:
    forged = tokens.mint({"k1": "z" * 32}, "k1", "acme", 60, now_s=NOW)
    with pytest.raises(tokens.BadSignature):
        tokens.verify(forged, KEYS, now_s=NOW)


def test_changed_claims_are_a_bad_signature() -> None:
    version, key_id, _, signature = tokens.mint(KEYS, "k1", "acme", 60, now_s=NOW).split(".")
    claims = base64.urlsafe_b64encode(json.dumps({"tenant": "other", "exp": NOW + 60}).encode()).rstrip(b"=")
    with pytest.raises(tokens.BadSignature):
        tokens.verify(f"{version}.{key_id}.{claims.decode()}.{signature}", KEYS, now_s=NOW)


@pytest.mark.parametrize("claims", [
    {"exp": NOW + 60},
    {"tenant": "acme"},
    {"tenant": "acme", "exp": True},
    {"tenant": "acme", "exp": "soon"},
    {"tenant": "a:b", "exp": NOW + 60},
    {"tenant": "acme", "exp": NOW + 60, "scope": "admin"},
    ["acme"],
])
def test_signed_but_unusable_claims_are_malformed(claims: object) -> None:
    # Signed with a configured key, as a buggy minter would: well-formed signature, unusable claims.
    signing_input = "ef1.k1." + base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    token = f"{signing_input}.{tokens._signature(KEYS['k1'], signing_input)}"
    with pytest.raises(tokens.MalformedToken):
        tokens.verify(token, KEYS, now_s=NOW)


@pytest.mark.parametrize("token", ["", "ef1.", "ef1.k1.e30", "ef1.k1.e30.short", "ef1.k.1.e30." + "A" * 43,
                                   "ef1.k1.e30." + "A" * 43 + "=", "ef1.k1." + "A" * 3000 + "." + "A" * 43])
def test_wrong_shapes_are_malformed(token: str) -> None:
    with pytest.raises(tokens.MalformedToken):
        tokens.verify(token, KEYS, now_s=NOW)


@given(position=st.integers(min_value=0), replacement=st.sampled_from("AQgw_-9z"))
def test_any_single_character_change_is_rejected(position: int, replacement: str) -> None:
    token = tokens.mint(KEYS, "k1", "acme", 60, now_s=NOW)
    i = position % len(token)
    tampered = token[:i] + replacement + token[i + 1:]
    if tampered == token:
        return
    with pytest.raises(tokens.TokenRejected):
        tokens.verify(tampered, KEYS, now_s=NOW)


def test_cli_prints_a_token_the_settings_key_verifies(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EVENTFLOW_INGEST__HMAC_KEYS", json.dumps(KEYS))
    assert main(["token", "--key-id", "k2", "--tenant", "acme", "--ttl-s", "120", "--scope", "read"]) == 0
    claims = tokens.verify(capsys.readouterr().out.strip(), KEYS)
    assert claims.tenant == "acme" and claims.scope is Scope.read


@pytest.mark.parametrize(("argv", "named"), [
    (["--key-id", "k9", "--tenant", "acme"], "--key-id: 'k9'"),
    (["--key-id", "k1", "--tenant", "a b"], "--tenant: 'a b'"),
])
def test_cli_errors_name_the_argument(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      argv: list[str], named: str) -> None:
    monkeypatch.setenv("EVENTFLOW_INGEST__HMAC_KEYS", json.dumps(KEYS))
    assert main(["token", *argv]) == 2
    out = capsys.readouterr()
    assert named in out.err and out.out == ""


def test_weak_or_misnamed_keys_are_refused_at_start(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EVENTFLOW_INGEST__HMAC_KEYS", json.dumps({"k1": "tiny-secret"}))
    assert main(["token", "--key-id", "k1", "--tenant", "acme"]) == 2
    err = capsys.readouterr().err
    assert "EVENTFLOW_INGEST__HMAC_KEYS" in err and "shorter than 32" in err and "tiny-secret" not in err
    monkeypatch.setenv("EVENTFLOW_INGEST__HMAC_KEYS", json.dumps({"k.1": "a" * 32}))
    assert main(["token", "--key-id", "k.1", "--tenant", "acme"]) == 2
    assert "key id 'k.1'" in capsys.readouterr().err


def test_verified_tokens_remember_good_tokens_and_still_expire_them() -> None:
    cache = tokens.VerifiedTokens(KEYS)
    token = tokens.mint(KEYS, "k1", "acme", 60, Scope.read, now_s=NOW)
    first = cache.verify(token, now_s=NOW)
    assert cache.verify(token, now_s=NOW + 59) == first == tokens.verify(token, KEYS, now_s=NOW)
    with pytest.raises(tokens.TokenExpired):
        cache.verify(token, now_s=NOW + 60)
    with pytest.raises(tokens.TokenExpired):  # forgotten, then refused again by the full check
        cache.verify(token, now_s=NOW + 61)


@given(st.integers(0, 200), st.sampled_from("AZaz09-_."))
def test_verified_tokens_refuse_what_verify_refuses(position: int, replacement: str) -> None:
    cache = tokens.VerifiedTokens(KEYS)
    token = tokens.mint(KEYS, "k1", "acme", 60, now_s=NOW)
    cache.verify(token, now_s=NOW)  # the genuine token is remembered; a near miss must not ride on it
    position %= len(token)
    altered = token[:position] + replacement + token[position + 1:]
    if altered == token:
        return
    with pytest.raises(tokens.TokenRejected):
        cache.verify(altered, now_s=NOW)
    with pytest.raises(tokens.TokenRejected):  # and a rejection is not remembered as anything
        cache.verify(altered, now_s=NOW)


def test_verified_tokens_forget_everything_when_full() -> None:
    cache = tokens.VerifiedTokens(KEYS, max_entries=2)
    minted = [tokens.mint(KEYS, "k1", f"tenant-{i}", 60, now_s=NOW) for i in range(5)]
    for token in minted:
        cache.verify(token, now_s=NOW)
        assert len(cache._claims) <= 2
    assert [cache.verify(t, now_s=NOW).tenant for t in minted] == [f"tenant-{i}" for i in range(5)]
