"""The `_method` guard's parsing, case by case (the gate's refusal itself is tested end to end in
tests/e2e/test_gate_routing.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from aegisd.gate.method_override import (
    _TYPE_SEPARATORS,
    OVERRIDE_INLINE_MAX,
    body_override,
    content_types,
    refuse_body_override,
)
from aegisd.gate.outbound_inspection import INLINE_BODY_MAX
from aegisd.gate.refusal import Refusal
from aegisd.inspection.literal_matcher import PatternScanner
from tests.unit.work_count import counted

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data; boundary=B"


def part(headers: bytes) -> bytes:
    """A one-part multipart body whose part has these header bytes."""
    return b"--B\r\n" + headers + b"\r\n\r\nDELETE\r\n--B--\r\n"


@pytest.mark.parametrize(("content_type", "body", "names_it"), [
    (FORM, b"_method=DELETE", True),
    (FORM, b"a=1&_method", True),  # a name with no value is still a field
    (FORM, b"a=1&%5f%6D%65%74%68%6f%64=DELETE", True),
    (FORM, b"%20_method=DELETE", True),  # PHP drops leading spaces
    (FORM, b"[method=DELETE", True),  # PHP: a `[` with no `]` becomes `_`
    (FORM, b"_method[]=DELETE", True),  # an array, which no framework takes as the method: refused all the same
    (FORM, b"_method%00x=DELETE", True),  # PHP ends a name at a NUL
    (FORM, b"[_method]=DELETE", True),  # Rack 2 drops the brackets around a name
    (FORM, b"_method]=DELETE", True),
    (FORM, b"payment_method=pm_123&shipping_method=x", False),
    ("application/x-www-form-urlencoded,x", b"_method=DELETE", True),  # Rack and PHP cut a type at a comma
    ("application/x-www-form-urlencoded x", b"_method=DELETE", True),
    ("text/json", b'{"_method": "DELETE"}', True),  # Laravel: any type holding /json or +json
    ("application/x; a=/json", b'{"_method": "DELETE"}', True),
    ("multipart/mixed; boundary=B",
     b'--B\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--B--', True),  # Rack parses it
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; name="x"; name="_method"\r\n\r\nD\r\n--B--', True),
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; a="; name=x"; name="_method"\r\n\r\nD\r\n--B--', True),
    (MULTIPART, b"--B\r\nContent-Disposition: form-data; name='_method'\r\n\r\nD\r\n--B--", True),
    (MULTIPART, b'--B\r\nContent-Disposition: form-data;\r\n name="_method"\r\n\r\nD\r\n--B--', True),
    (MULTIPART, b"--B\r\nContent-ID: <_method>\r\n\r\nDELETE\r\n--B--", True),  # Rack names a nameless part so
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; name="' + b" " * 500 + b'_method"\r\n\r\nD\r\n--B--',
     True),  # PHP drops the leading spaces, however many
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; name="payment_method"\r\n\r\npm\r\n--B--', False),
    ("multipart/form-data", b"_method=DELETE", True),  # no boundary: Rack reads the body as a form
    # PHP: no space after the colon, a lone CR, a CR or ';' opening a joined line; Rack 2: LF LF inside a head
    (MULTIPART, part(b'Content-Disposition:name="_method"'), True),
    (MULTIPART, part(b'Content-Disposition: form-data\r;name="_method"'), True),
    (MULTIPART, part(b'Content-Disposition: form-data\r\n;name="_method"'), True),
    (MULTIPART, part(b'Content-Disposition: form-data\n\r;name="_method"'), True),
    (MULTIPART, part(b'Content-Disposition: form-data\n\n; name="_method"'), True),
    (MULTIPART, part(b'Content-Disposition: form-data;\rname="_method"'), True),  # a lone CR is whitespace
    (MULTIPART, part(b'Content-Disposition: form-data;\r\n\rname="_method"'), True),
    (MULTIPART, part(b'Content-Disposition:\rname="_method"'), True),
    (MULTIPART, part(b'Content-Disposition: form-data; x="a"\rname="_method"'), True),
    (MULTIPART, part(b"Content-Disposition: form-data; name=\x00_method"), True),  # Rack 3.1 strips the NUL
    (MULTIPART, part(b"Content-Disposition: form-data; name= \x00\x00_method"), True),
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; name="\\_m\\ethod"\r\n\r\nD\r\n--B--', True),  # Rack dequotes
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; name="_meth\r\nod"\r\n\r\nD\r\n--B--', True),  # PHP joins
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; na\r\nme="_method"\r\n\r\nD\r\n--B--', True),
    (MULTIPART, b"--B\r\nContent-Disposition: form-data; name=_method,x\r\n\r\nD\r\n--B--", True),  # Rack 2's token
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; x="a:b"; name="_method"\r\n\r\nD\r\n--B--', True),
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; name="view"; filename="edit.html.erb"\r\n\r\n'
     b'<form><input type="hidden" name="_method" value="patch"></form>\r\n--B--', False),  # a file's text
    (FORM, b"a=%26_method%3DDELETE", False),  # inside a value, encoded
    (FORM, b"method=DELETE&_methods=1", False),
    ("application/json", b'{"a": {"_method": "DELETE"}}', True),  # nested: errs towards refusing
    ("application/json", b'{"_method"\n:\t"DELETE"}', True),
    ("application/json", b'{"\\u005F\\u006D\\u0065\\u0074\\u0068\\u006F\\u0064": 1}', True),
    ("application/json", b'{"_method_": 1, "a": "\\u00e9"}', False),
    ("application/problem+json", b'{"_method": 1}', True),
    (MULTIPART, b'--B\r\nContent-Disposition: form-data; name=_method\r\n\r\nDELETE\r\n--B--', True),
    (MULTIPART, b'--B\r\nCONTENT-DISPOSITION: form-data; name="x"\r\n\r\n_method\r\n--B--', False),
    ("text/csv", b"_method,DELETE", False),
])
def test_what_names_the_parameter(content_type: str, body: bytes, names_it: bool) -> None:
    assert body_override(content_type, body) is names_it


@pytest.mark.parametrize(("content_type", "body"), [
    (MULTIPART, b"method " + b"content-disposition:" * (INLINE_BODY_MAX // 20)),
    (MULTIPART, b"name=\"" + b"method" * (INLINE_BODY_MAX // 6)),
    (FORM, b"method" + b"&" * INLINE_BODY_MAX),
    (FORM, b"%" + b"&method" * (INLINE_BODY_MAX // 7)),
    ("application/json", b'"\\u' + b'"_method "' * (INLINE_BODY_MAX // 10)),
    ("a" * 65536, b"x"),  # a long Content-Type: split, never matched position by position
], ids=["multipart-dispositions", "multipart-names", "form-separators", "form-fields", "json-quotes", "type"])
def test_crafted_bodies_cost_work_linear_in_their_size(content_type: str, body: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a cold review: a line of repeated `content-disposition:` took time quadratic in its length, 50 s
    for 256 KiB on the event loop (a backtracking `re` search), and a form of 256 KiB of `&` 0.2 s (a Python loop
    over its fields). Counted, not timed: each reading of the body is one Hyperscan scan, an automaton that reads
    each byte once whatever the data; the only `re` call splits the Content-Type at separators (a repeated
    character class, which reads each byte once too); and the Python code run does not grow with the body."""
    scanned: list[int] = []
    scan = PatternScanner.scan

    def counted_scan(scanner: PatternScanner, data: bytes, *args: Any) -> bool:
        scanned.append(len(data))
        return scan(scanner, data, *args)

    monkeypatch.setattr(PatternScanner, "scan", counted_scan)
    with counted(budget=10_000) as work:
        body_override(content_type, body)
    assert 0 < sum(scanned) <= 3 * len(body), scanned  # a form, a multipart form, JSON (its hint and its key)
    assert work.regex_calls == [("split", _TYPE_SEPARATORS.pattern)], work.regex_calls
    # 17 to 28 lines, and about 9 more for each pattern compiled at its first scan; a loop over the body's fields
    # or positions would run tens of thousands.
    assert work.lines <= 100, work.lines


def test_a_large_body_is_read_off_the_event_loop_with_the_same_answer() -> None:
    """Past OVERRIDE_INLINE_MAX the check runs in inspection's threads; the loop keeps turning meanwhile."""
    body = b"&".join(b"f%d=v%%20%d" % (i, i) for i in range(OVERRIDE_INLINE_MAX // 8)) + b"&_method=DELETE"
    assert len(body) > OVERRIDE_INLINE_MAX

    async def run() -> int:
        ticks = 0
        check = asyncio.ensure_future(refuse_body_override(FORM, body))
        while not check.done():
            ticks += 1
            await asyncio.sleep(0)
        with pytest.raises(Refusal) as refused:
            await check
        assert refused.value.code == "override_not_allowed"
        return ticks

    assert asyncio.run(run()) > 1


@pytest.mark.parametrize(("headers", "expected"), [
    ([("Content-Type", "a/b"), ("content-type", "c/d")], "a/b, c/d"),
    ([("Content_Type", "application/json"), ("X-Other", "1")],  # some CGI servers read it as the type; without
     "application/json, application/x-www-form-urlencoded"),  # it, Rack reads an untyped body as a form
    ([("Content.Type", "text/json"), ("Content-Type", "text/plain")], "text/plain, text/json"),
    ([("Content.Type", "application/json")], "application/json, application/x-www-form-urlencoded"),
    ([("Accept", "x/y")], ""),
])
def test_the_type_is_read_from_every_header_a_cgi_server_would_pass_as_it(headers: list[tuple[str, str]],
                                                                           expected: str) -> None:
    assert content_types(CIMultiDictProxy(CIMultiDict(headers))) == expected


def test_a_type_spelt_for_cgi_does_not_hide_the_untyped_form_reading() -> None:
    """Found by a cold review: with only `Content.Type: application/json`, the body was no longer read as the form
    that Rack, behind a server that drops the header, reads it as."""
    types = content_types(CIMultiDictProxy(CIMultiDict([("Content.Type", "application/json")])))
    assert body_override(types, b"_method=DELETE") and body_override(types, b'{"_method": "DELETE"}')
