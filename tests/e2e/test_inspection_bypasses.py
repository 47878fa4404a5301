"""Found by a cold review: a secret with percent and JSON escapes mixed in it (`%73\\u006b-live-...`, or the
two kinds alternating) passed inspection: the second decoding layer was built only where decoding one kind
of escape made the other kind. Such a request was forwarded (body, headers) and, in a path, its secret was
recorded unmasked in the ledger. docs/SECURITY.md promises any mix of percent and JSON escapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.gate_support import GateWorld, untouched
from tests.upstreams import Upstream

OWN = "own-mixed-secret-K3y9Q2w7"  # the credential the agent calls through
OTHER = "other-mixed-secret-Z8x7C6v5"  # another credential's, not granted to the agent


def _pct(char: str) -> str:
    return f"%{ord(char):02X}"


def _json(char: str) -> str:
    return f"\\u{ord(char):04x}"


MIXES: dict[str, Callable[[str], str]] = {
    "percent then JSON": lambda s: _pct(s[0]) + _json(s[1]) + s[2:],
    "JSON then percent": lambda s: _json(s[0]) + _pct(s[1]) + s[2:],
    "alternating": lambda s: "".join(_pct(c) if i % 2 else _json(c) for i, c in enumerate(s)),
    "a JSON-escaped % among JSON escapes": lambda s: "\\u0025" + f"{ord(s[0]):02X}" + _json(s[1]) + s[2:],
    "a percent-encoded JSON escape among percent escapes": lambda s: f"%5Cu00{ord(s[0]):02x}" + _pct(s[1]) + s[2:],
}
# A path may hold no backslash, raw or `%5C` (the front door refuses it, 400, and records no path), so a JSON
# escape reaches a path percent-encoded twice: three layers of decoding, mixed with a percent escape.
PATH_MIXES: dict[str, Callable[[str], str]] = {
    "a doubly percent-encoded JSON escape": lambda s: f"%255Cu00{ord(s[0]):02x}" + _pct(s[1]) + s[2:],
    "a percent escape inside that": lambda s: f"%255Cu0025{ord(s[0]):02X}" + _pct(s[1]) + s[2:],
}
CASES = [(mix, whose) for mix in MIXES for whose in ("own", "other")]
PATH_CASES = [(mix, whose) for mix in PATH_MIXES for whose in ("own", "other")]


@dataclass
class Bypass:
    world: GateWorld
    up: Upstream


@pytest.fixture(scope="module")
def bypass() -> Iterator[Bypass]:
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("own", OWN, up.entry())
        world.credential("other", OTHER, up.entry())
        world.agent("bot", "own")
        yield Bypass(world, up)
    finally:
        world.close()


def _encoded(mix: str, whose: str) -> str:
    return {**MIXES, **PATH_MIXES}[mix](OWN if whose == "own" else OTHER)


def _assert_blocked(world: GateWorld, reply_status: int, reply_text: str, where: str) -> None:
    assert reply_status == 403, reply_text
    assert "body_inspection" in reply_text and "vault_secret" in reply_text and where in reply_text, reply_text


@pytest.mark.parametrize(("mix", "whose"), CASES)
def test_a_mixed_escape_secret_in_the_body_is_refused(bypass: Bypass, mix: str, whose: str) -> None:
    world, encoded = bypass.world, _encoded(mix, whose)
    with untouched(bypass.up):
        reply = world.call("POST", "/own/echo/body", [("Content-Type", "application/json")],
                           ('{"note": "' + encoded + '"}').encode(), agent="bot")
    _assert_blocked(world, reply.status, reply.text(), "body")
    world.assert_refused(reply, 403, "body_inspection", flags="body_inspection_block=vault_secret")


@pytest.mark.parametrize(("mix", "whose"), CASES)
def test_a_mixed_escape_secret_in_a_header_or_the_query_is_refused(bypass: Bypass, mix: str, whose: str) -> None:
    world, encoded = bypass.world, _encoded(mix, whose)
    with untouched(bypass.up):
        in_header = world.call("GET", "/own/echo/header", [("X-Note", encoded)], agent="bot")
        in_query = world.call("GET", f"/own/echo/query?page=2&note={encoded}", agent="bot")
    _assert_blocked(world, in_header.status, in_header.text(), "headers")
    _assert_blocked(world, in_query.status, in_query.text(), "query string")


@pytest.mark.parametrize(("mix", "whose"), PATH_CASES)
def test_a_mixed_escape_secret_in_the_path_is_refused_and_masked_in_the_ledger(bypass: Bypass, mix: str,
                                                                               whose: str) -> None:
    world, encoded = bypass.world, _encoded(mix, whose)
    with untouched(bypass.up):
        reply = world.call("GET", f"/own/echo/notes/{encoded}/tail", agent="bot")
        refused = world.call("GET", f"/other/echo/{encoded}/x", agent="bot")  # no grant: refused before inspection
    _assert_blocked(world, reply.status, reply.text(), "path")
    world.assert_refused(reply, 403, "body_inspection", path="/echo/notes/[REDACTED]/tail")
    world.assert_refused(refused, 403, "not_granted", path="/echo/[REDACTED]/x")
    world.assert_no_leaks()
