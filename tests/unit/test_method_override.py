"""The `_method` guard's parsing, case by case (the gate's refusal itself is tested end to end in
tests/e2e/test_gate_routing.py)."""

from __future__ import annotations

import asyncio

import pytest

from aegisd.gate.method_override import body_override, refuse_body_override
from aegisd.gate.outbound_inspection import INLINE_BODY_MAX
from aegisd.gate.refusal import Refusal

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data; boundary=B"


@pytest.mark.parametrize(("content_type", "body", "names_it"), [
    (FORM, b"_method=DELETE", True),
    (FORM, b"a=1&_method", True),  # a name with no value is still a field
    (FORM, b"a=1&%5f%6D%65%74%68%6f%64=DELETE", True),
    (FORM, b"%20_method=DELETE", True),  # PHP drops leading spaces
    (FORM, b"[method=DELETE", True),  # PHP: a `[` with no `]` becomes `_`
    (FORM, b"_method[]=DELETE", False),  # an array, which no framework takes as the method
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


def test_a_large_body_is_read_off_the_event_loop_with_the_same_answer() -> None:
    """Past INLINE_BODY_MAX the check runs in inspection's threads; the loop keeps turning meanwhile."""
    body = b"&".join(b"f%d=v%%20%d" % (i, i) for i in range(INLINE_BODY_MAX // 8)) + b"&_method=DELETE"
    assert len(body) > INLINE_BODY_MAX

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
