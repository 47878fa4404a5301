"""Step 6's guard: nothing in a request may make the upstream act on another method or path than its request line's.

Scopes and policy rules judge the request line. Many upstream frameworks let a request say otherwise: headers
(Rails, Laravel, Symfony, ASP.NET, Google's APIs; IIS URL Rewrite, Zend) and, on a POST, a `_method` parameter in
the query string (Symfony, Laravel) or the body (Rails' Rack in a form; Symfony and Laravel in a form, Laravel in
JSON too). A POST with `_method=DELETE` on a credential whose policy allows POST but not DELETE would pass. Such
requests are refused (400 `override_not_allowed`) rather than stripped: stripping would quietly turn the agent's
DELETE into the POST it sent, and it would go on as if its DELETE had been done.
"""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote_to_bytes

from multidict import CIMultiDictProxy

from aegisd.gate.outbound_inspection import INLINE_BODY_MAX, INSPECTION_THREADS
from aegisd.gate.refusal import Refusal
from aegisd.inspection.literal_matcher import LiteralScanner

OVERRIDE_HEADERS = (("X-HTTP-Method-Override", "method"), ("X-HTTP-Method", "method"), ("X-Method-Override", "method"),
                    ("X-Forwarded-Method", "method"), ("X-Original-URL", "path"), ("X-Rewrite-URL", "path"))
PARAMETER = b"_method"
# Only a POST's `_method` is honoured by the frameworks that read one.
OVERRIDABLE = "POST"
_FIELD_SEPARATOR = re.compile(rb"[&;]")


def _json_letter(c: int) -> bytes:
    """A pattern for one letter of a JSON key: itself, or its \\u escape with hex digits in either case."""
    hex_digits = b"".join(b"[%c%c]" % (d, d - 32) if d in b"abcdef" else bytes([d]) for d in b"%04x" % c)
    return b"(?:%s|\\\\u%s)" % (re.escape(bytes([c])), hex_digits)


# A JSON key `_method`, any of its letters possibly escaped: one pass, which the regex engine starts only at a `"`.
_JSON_KEY = re.compile(b'"' + b"".join(map(_json_letter, PARAMETER)) + rb'"\s*:')
# A multipart part's `name` parameter, quoted or not.
_PART_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*?[;\s]name\s*=\s*(?:"([^"\r\n]*)"|([^;\s]*))')
# What a body must hold for each kind to name the parameter, found by Hyperscan in ~12 µs per 64 KiB: Python's
# own search for a short byte string takes 40, and most bodies hold none of these.
_JSON_HINTS = LiteralScanner([PARAMETER, b"\\u"])
_FORM_HINTS = LiteralScanner([b"method", b"%"])
_MULTIPART_HINTS = LiteralScanner([b"method"])


def refuse_overrides(method: str, headers: CIMultiDictProxy[str], query: str) -> None:
    """Refuse a request whose headers, or (on a POST) query string, would override its method or path upstream.
    Six header lookups in C; the query is parsed only when it could hold the parameter."""
    for name, what in OVERRIDE_HEADERS:
        if name in headers:
            raise Refusal(400, "override_not_allowed", f"the {name} header would make the upstream act on another "
                          f"{what} than the request line's, which the gate judges (scopes, policy rules): send the "
                          f"{what} you mean in the request line instead")
    if (method == OVERRIDABLE and ("method" in query or "%" in query)
            and _form_names_override(query.encode("utf-8", "surrogateescape"))):
        raise _parameter_refusal("query string")


def body_override(content_type: str, body: bytes) -> bool:
    """Whether a POST body of this type carries a `_method` field as the frameworks that read one parse it: a form
    (also when no type is given, as Rack reads it), a multipart form, or a JSON object's key (anywhere in it, which
    errs towards refusing). Linear in the body."""
    kind = content_type.partition(";")[0].strip().lower()
    if kind in ("", "application/x-www-form-urlencoded"):
        return _holds_any(_FORM_HINTS, body) and _form_names_override(body)
    if kind == "multipart/form-data":
        return _holds_any(_MULTIPART_HINTS, body) and any(
            _php_name(m.group(1) if m.group(1) is not None else m.group(2)) == PARAMETER
            for m in _PART_NAME.finditer(body))
    if kind == "application/json" or kind.endswith("+json"):
        return _holds_any(_JSON_HINTS, body) and _JSON_KEY.search(body) is not None
    return False


async def refuse_body_override(content_type: str, body: bytes) -> None:
    """`body_override` as a refusal, for the pipeline; a body past INLINE_BODY_MAX is read in inspection's threads,
    so that a large form cannot hold the event loop (a 3.5 MB form of short fields takes 0.3 s)."""
    if len(body) <= INLINE_BODY_MAX:
        found = body_override(content_type, body)
    else:
        found = await asyncio.get_running_loop().run_in_executor(INSPECTION_THREADS, body_override, content_type, body)
    if found:
        raise _parameter_refusal("body")


def _holds_any(hints: LiteralScanner, data: bytes) -> bool:
    return not hints.scan(data, _stop)


def _stop(*_: object) -> bool:
    return True


def _form_names_override(data: bytes) -> bool:
    """Whether `a=1&_method=DELETE`-shaped data names the parameter, percent-encoded or not."""
    for field in _FIELD_SEPARATOR.split(data):
        name = field.partition(b"=")[0]
        if b"%" in name or b"+" in name:
            name = unquote_to_bytes(name.replace(b"+", b" "))
        if _php_name(name) == PARAMETER:
            return True
    return False


def _php_name(name: bytes) -> bytes:
    """A field name as PHP registers it (Symfony and Laravel read PHP's): leading spaces dropped, spaces and dots
    made underscores, and a `[` with no `]` after it too, so `.method`, `[method` and ` _method` all mean `_method`.
    Other frameworks read names as sent, which this also catches."""
    name = name.lstrip(b" ").replace(b" ", b"_").replace(b".", b"_")
    bracket = name.find(b"[")
    if bracket >= 0 and name.find(b"]", bracket) < 0:
        name = name[:bracket] + b"_" + name[bracket + 1:]
    return name


def _parameter_refusal(where: str) -> Refusal:
    return Refusal(400, "override_not_allowed", f"the {where} carries a _method parameter, which would make the "
                   "upstream act on another method than the request line's, which the gate judges (scopes, policy "
                   "rules): send the method you mean in the request line instead")
