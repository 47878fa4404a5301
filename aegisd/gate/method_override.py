"""Step 6's guard: nothing in a request may make the upstream act on another method or path than its request line's.

Scopes and policy rules judge the request line. Many upstream frameworks let a request say otherwise: headers
(Rails, Laravel, Symfony, ASP.NET, Google's APIs; IIS URL Rewrite, Zend) and, on a POST, a `_method` parameter in
the query string (Symfony, Laravel) or the body (Rails' Rack in a form; Symfony and Laravel in a form, Laravel in
JSON too). A POST with `_method=DELETE` on a credential whose policy allows POST but not DELETE would pass. Such
requests are refused (400 `override_not_allowed`) rather than stripped: stripping would quietly turn the agent's
DELETE into the POST it sent, and it would go on as if its DELETE had been done.

The parsers these frameworks use differ in how they read a type, a field's name and a multipart header, so every
reading that any of them could make of the request is checked, erring towards refusing: a body is read as a form,
a multipart form or JSON whenever any of them would read it so, and a name counts whatever the rules of PHP
(a NUL ends it; leading spaces go; dots and an unmatched `[` become `_`) or Rack (brackets around it go) make of it.
"""

from __future__ import annotations

import asyncio
import re

from multidict import CIMultiDictProxy

from aegisd.gate.headers import cgi_name, plain_names
from aegisd.gate.outbound_inspection import INSPECTION_THREADS
from aegisd.gate.refusal import Refusal
from aegisd.inspection.literal_matcher import PatternScanner

OVERRIDE_HEADERS = (("X-HTTP-Method-Override", "method"), ("X-HTTP-Method", "method"), ("X-Method-Override", "method"),
                    ("X-Forwarded-Method", "method"), ("X-Original-URL", "path"), ("X-Rewrite-URL", "path"))
# CGI-style servers give `X_HTTP_Method_Override` and `X-HTTP-Method-Override` one variable, and some (lighttpd; PHP
# registering what Caddy passes) make any byte but a letter or digit an `_`: X.HTTP.Method.Override too.
_OVERRIDE_BY_CGI_NAME = {name.lower().replace("-", "_"): (name, what) for name, what in OVERRIDE_HEADERS}
# Bodies up to this size are scanned on the event loop: a crafted one in up to about 5 ms (20 ms at 256 KiB), a
# plain one in well under 0.1 ms; handing one to a thread costs some 40 µs.
OVERRIDE_INLINE_MAX = 64 * 1024
# Only a POST's `_method` is honoured by the frameworks that read one.
OVERRIDABLE = "POST"
FORM_TYPE = "application/x-www-form-urlencoded"
# Rack and PHP end a media type at a `;`, a `,` or a space.
_TYPE_SEPARATORS = re.compile(r"[;,\s]+")


def _either(byte: int, escape: bytes) -> bytes:
    """A pattern for one byte of the name: itself, or `escape` and its hex code in either case (`%5F`, `\\u005f`)."""
    hex_digits = b"".join(b"[%c%c]" % (d, d - 32) if d in b"abcdef" else bytes([d]) for d in b"%02x" % byte)
    return b"(?:%s|%s%s)" % (re.escape(bytes([byte])), escape, hex_digits)


def _name(escape: bytes) -> bytes:
    return b"".join(_either(byte, escape) for byte in b"method")


# The three readings, each one Hyperscan pattern: linear in the data whatever it holds, and run without the GIL.
# A form field: after any leading spaces (PHP drops them) or brackets (Rack 2 drops them), `_` or what PHP makes
# one (`.`, an unmatched `[`), then `method`, ending the name, at a NUL (PHP) or an array's `[` too; any byte may
# be percent-encoded.
_FORM = PatternScanner([
    rb"(?:^|[&;])(?:\+| |%20|\[|\]|%5[bBdD])*(?:_|%5[fF]|\.|%2[eE]|\[|%5[bB])" + _name(b"%")
    + rb"(?:$|[=&;\[\]\x00]|%00|%5[bBdD])"])


def _joined(text: bytes) -> bytes:
    """`text` (letters in either case) as a multipart header may carry it: each byte possibly after a backslash
    (Rack drops one from a quoted value), a line break (PHP joins a header line without a colon to the one before,
    with nothing between) or a lone CR (whitespace to PHP and Rack before a parameter)."""
    return b"".join(rb"(?:\\|\r|\n)*" + (b"[%c%c]" % (c, c - 32) if 0x61 <= c <= 0x7a else re.escape(bytes([c])))
                    for c in text)


# A multipart part named so by a `name` parameter anywhere in a header block that has a Content-Disposition (up to
# the CRLF CRLF that ends a part's headers for Rack; PHP ends them at LF (CR) LF, and runs a lone CR, a line that
# starts with a space or a CR, and a line without a colon into the header before), quoted either way or not, or
# (Rack, for a part without one) by its Content-ID; the name as PHP or Rack registers it, ending at any byte a name
# of theirs cannot hold. Anywhere in the body, since a boundary can be read more than one way, but never across a
# CRLF CRLF, so an uploaded HTML form that says name="_method" in its text passes. Erring towards refusing, a
# `filename` parameter counts too (a file named `_method` is refused). Rack 3.1 strips NULs with the whitespace
# around an unquoted last value.
_MULTIPART_NAME = (rb"[\"']?(?:[ \[\]]|\\|\r?\n)*[_.\[]" + b"".join(
    rb"(?:\\|\r?\n)*" + bytes([c]) for c in b"method") + rb"(?:$|[^A-Za-z0-9_-])")
_NO_BLANK_LINE = rb"(?:[^\r]|\r(?:[^\n]|\n(?:[^\r]|\r[^\n])))*"
_MULTIPART = PatternScanner([
    _joined(b"content-disposition") + rb"\s*:" + _NO_BLANK_LINE + _joined(b"name") + rb"\s*=[\s\x00]*"
    + _MULTIPART_NAME,
    _joined(b"content-id") + rb"\s*:\s*<?" + _MULTIPART_NAME])
# A JSON key `_method` (anywhere in the body, not only at the top, erring towards refusing), letters escaped or not.
_JSON = PatternScanner([rb'"' + _either(ord("_"), rb"\\u00") + _name(rb"\\u00") + rb'"\s*:'])
# What such a key holds, one or the other: found in half the time the pattern takes in a body of JSON, where every
# `"` starts a candidate for it.
_JSON_HINTS = PatternScanner([re.escape(b"_method"), re.escape(b"\\u00")])


def refuse_overrides(method: str, headers: CIMultiDictProxy[str], query: str) -> None:
    """Refuse a request whose headers, or (on a POST) query string, would override its method or path upstream.
    Six header lookups in C and a pass over the names; the query is scanned only when it could hold the parameter."""
    for name, what in OVERRIDE_HEADERS:
        if name in headers:
            raise _header_refusal(name, what)
    if not plain_names(headers):
        for name in headers:
            if (found := _OVERRIDE_BY_CGI_NAME.get(cgi_name(name))) is not None:
                raise _header_refusal(name, found[1])
    if (method == OVERRIDABLE and ("method" in query or "%" in query)
            and _FORM.search(query.encode("utf-8", "surrogateescape"))):
        raise _parameter_refusal("query string")


def content_types(headers: CIMultiDictProxy[str]) -> str:
    """Every value of the request's Content-Type header, joined, counting the names some CGI-style servers read as
    it (`Content_Type`, `Content.Type`; Symfony takes its type from whichever the server passes), and with those
    alone the form type too, as the servers that drop them leave Rack to read it."""
    own = headers.getall("Content-Type", ())
    if plain_names(headers):
        return ", ".join(own)
    spelt_for_cgi = [value for name, value in headers.items()
                     if name.lower() != "content-type" and cgi_name(name) == "content_type"]
    # A server that does not pass those on leaves Rack a body without a type, which it reads as a form.
    return ", ".join([*own, *spelt_for_cgi, *([] if own or not spelt_for_cgi else [FORM_TYPE])])


def body_override(content_type: str, body: bytes) -> bool:
    """Whether a POST body carries a `_method` field as any framework that reads one could parse it, given its
    Content-Type header (all of its values, joined): as a form when a form type is named or none is (Rack reads an
    untyped body as one), as a multipart form when a multipart type is, and as JSON when the header says `/json`
    or `+json` anywhere (Laravel's test). About 12 µs per 64 KiB for each reading that applies."""
    lowered = content_type.lower()
    types = {token for token in _TYPE_SEPARATORS.split(lowered) if "/" in token}
    multipart = any(kind.startswith("multipart/") for kind in types)
    # Rack reads a multipart body without a boundary it can use as a form.
    if (not types or FORM_TYPE in types or multipart) and _FORM.search(body):
        return True
    if multipart and _MULTIPART.search(body):
        return True
    return ("/json" in lowered or "+json" in lowered) and _JSON_HINTS.search(body) and _JSON.search(body)


async def refuse_body_override(content_type: str, body: bytes) -> None:
    """`body_override` as a refusal, for the pipeline; a body past OVERRIDE_INLINE_MAX is scanned in inspection's
    threads (Hyperscan scans without the GIL, so the loop goes on meanwhile)."""
    if len(body) <= OVERRIDE_INLINE_MAX:
        found = body_override(content_type, body)
    else:
        found = await asyncio.get_running_loop().run_in_executor(INSPECTION_THREADS, body_override, content_type, body)
    if found:
        raise _parameter_refusal("body")


def _header_refusal(name: str, what: str) -> Refusal:
    return Refusal(400, "override_not_allowed", f"the {name} header would make the upstream act on another {what} "
                   f"than the request line's, which the gate judges (scopes, policy rules): send the {what} you "
                   "mean in the request line instead")


def _parameter_refusal(where: str) -> Refusal:
    return Refusal(400, "override_not_allowed", f"the {where} carries a _method parameter, which would make the "
                   "upstream act on another method than the request line's, which the gate judges (scopes, policy "
                   "rules): send the method you mean in the request line instead")
