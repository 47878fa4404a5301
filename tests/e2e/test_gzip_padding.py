"""A gzip request body cannot hide a member behind zero padding: gzip (and Python's gzip module, so the
upstream) skips zeros between members and reads on, and so does inspection, whether the body says
`Content-Encoding: gzip` or is an uploaded .gz file recognised by its magic bytes."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import pytest

from tests.e2e.gate_support import GateWorld, untouched
from tests.e2e.inspection_support import LeakyUpstream

OWN = "pad-own-secret-Q7w8E9r0T1y2"
OTHER = "pad-other/Secret+Value=99&x~"


@pytest.fixture(scope="module")
def padded() -> Iterator[tuple[GateWorld, LeakyUpstream]]:
    world = GateWorld.start()
    try:
        up = LeakyUpstream()
        world.upstreams.append(up)
        up.start()
        world.credential("own", OWN, up.entry())
        world.credential("other", OTHER, up.entry())
        world.agent("bot", "own")
        yield world, up
    finally:
        world.close()


def body(note: str, padding: bytes) -> bytes:
    return gzip.compress(b'{"greeting": "hello", ') + padding + gzip.compress(json.dumps({"note": note}).encode()[1:])


HOW = {"content-encoding": [("Content-Type", "application/json"), ("Content-Encoding", "gzip")],
       "sniffed": [("Content-Type", "application/gzip")]}  # an uploaded .gz file


@pytest.mark.parametrize("how", list(HOW))
def test_a_secret_in_a_member_after_zero_padding_is_found(padded: tuple[GateWorld, LeakyUpstream], how: str) -> None:
    world, up = padded
    for secret in (OWN, OTHER):
        sent = body(secret, b"\0" * 4)
        assert json.loads(gzip.decompress(sent))["note"] == secret  # what the upstream would have read
        with untouched(up):
            reply = world.call("POST", f"/own/echo/pad-{how}", HOW[how], sent, agent="bot")
        row = world.assert_refused(reply, 403, "body_inspection")
        assert row["flags"] == "body_inspection_block=vault_secret", row
    world.assert_no_leaks()


def test_a_clean_padded_body_is_forwarded_as_sent(padded: tuple[GateWorld, LeakyUpstream]) -> None:
    world, up = padded
    sent = body("nothing secret", b"\0" * 4) + b"\0\0"
    reply = world.call("POST", "/own/echo/pad-clean", HOW["sniffed"], sent, agent="bot")
    assert reply.status == 200, reply.text()
    assert up.requests_to("/echo/pad-clean")[-1].body == sent
    assert json.loads(gzip.decompress(sent)) == {"greeting": "hello", "note": "nothing secret"}
    world.assert_no_leaks()


def test_a_gz_upload_cut_short_is_inspected_for_what_decodes(padded: tuple[GateWorld, LeakyUpstream]) -> None:
    """Found in review: an uploaded .gz whose trailer (or a second member) was cut off failed to decode as a
    whole and was inspected only as its compressed bytes, though gunzip prints what it can decode of it."""
    world, up = padded
    for secret in (OWN, OTHER):
        whole = gzip.compress(json.dumps({"note": secret}).encode())
        for cut in (gzip.compress(b"x" * 300) + whole[:-4],  # the second member's CRC and size missing
                    whole[:-8]):  # the whole trailer missing
            with untouched(up):
                reply = world.call("POST", "/own/echo/cut", HOW["sniffed"], cut, agent="bot")
            row = world.assert_refused(reply, 403, "body_inspection")
            assert row["flags"] == "body_inspection_block=vault_secret", row
    world.assert_no_leaks()
