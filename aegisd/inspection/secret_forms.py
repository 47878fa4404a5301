"""The byte strings a vault secret turns into when an agent encodes it, and when an upstream echoes it.

Computed once per routing-table build. Base64 needs care: a secret inside a longer base64 blob is
encoded differently depending on its offset modulo 3, and the characters at its two edges mix in
neighbouring bytes. For each of the three offsets we keep only the characters whose six bits come
entirely from the secret; one of those three cores appears in any blob that contains the secret.

An upstream echoes what the gate sent it, which for query and basic auth is a spelling of the secret
(`wire_values`), and may encode that once more: a login redirect carrying the original URL in `?next=`
percent-encodes the query value's `%2F` again as `%252F`. Response redaction replaces those too.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable
from urllib.parse import quote, quote_from_bytes, quote_plus

# Shorter secrets are not searched for: they would match ordinary text. The well-known key formats
# still apply to them, and docs/inspection.md says so.
MIN_SECRET_LENGTH = 8
_PLACEHOLDER_PASSWORD = 2  # bytes: a basic-auth password this short (`X`, empty) leaves the key in the username
_B64: tuple[Callable[[bytes], bytes], ...] = (base64.b64encode, base64.urlsafe_b64encode)
_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-f]{4}")


def secret_values(secret: bytes, auth_type: str) -> tuple[bytes, ...]:
    """What counts as the secret: the stored value, and for basic auth also the password on its own, or the
    username on its own when the password is empty or a placeholder of one or two bytes: Stripe's
    `sk_live_...:` and Freshdesk's `KEY:X` put the key in the username, which a whoami answer echoes (a
    username beside a real password, even a short one, is a name, not a secret)."""
    values = [secret]
    if auth_type == "basic" and b":" in secret:
        user, password = secret.split(b":", 1)
        values.append(user if len(password) <= _PLACEHOLDER_PASSWORD else password)
    return tuple(v for v in values if len(v) >= MIN_SECRET_LENGTH)


def url_forms(secret: bytes) -> set[bytes]:
    """Percent-encodings as common encoders write them (Python's quote and quote_plus, JavaScript's
    encodeURIComponent, and `~` as `%7E` as Java's URLEncoder, PHP's urlencode and .NET write it), in upper-
    and lower-case hex. Mixed encodings are undone by views.py."""
    forms = {quote_from_bytes(secret, safe="").encode(), quote_from_bytes(secret).encode(),
             quote_plus(secret, safe="").encode(), quote(secret, safe="!*'()").encode(),
             quote_plus(secret, safe="*").encode()}  # Java's URLEncoder: `*` kept, `!'()` encoded
    forms |= {form.replace(b"~", b"%7E") for form in forms}
    return forms | {_lower_hex(f) for f in forms}


def json_forms(secret: bytes) -> set[bytes]:
    """The secret inside a JSON string as `json.dumps` writes it, ASCII-escaped or not, and with the hex
    digits of its `\\uXXXX` escapes upper-case (.NET, Java). Matched as they are, which is all a body whose only
    escapes are `\\"` and `\\n`-like ones needs; other spellings and mixes are undone before matching: by views.py
    in requests (every JSON string escape that can spell a character of some vault secret), every JSON string
    escape by the redactor's second stage in responses."""
    try:
        text = secret.decode()
    except UnicodeDecodeError:
        return set()
    escaped = json.dumps(text)[1:-1]
    upper = _UNICODE_ESCAPE.sub(lambda m: "\\u" + m.group()[2:].upper(), escaped)
    return {escaped.encode(), upper.encode(), json.dumps(text, ensure_ascii=False)[1:-1].encode()}


def base64_cores(secret: bytes) -> set[bytes]:
    """For each alphabet and each offset mod 3, the base64 characters that depend only on the secret."""
    cores = set()
    for encode in _B64:
        for shift in range(3):
            encoded = encode(b"\0" * shift + secret + b"\0\0")
            first = -(-8 * shift // 6)  # the first character whose bits all lie inside the secret
            end = 8 * (shift + len(secret)) // 6  # one past the last such character
            cores.add(encoded[first:end])
    return cores


def base64_whole(secret: bytes) -> set[bytes]:
    """The secret base64-encoded on its own, padded and unpadded, in both alphabets."""
    forms = {encode(secret) for encode in _B64}
    return forms | {f.rstrip(b"=") for f in forms}


def search_forms(values: Iterable[bytes]) -> set[bytes]:
    """Every form body inspection looks for: raw, URL-encoded, JSON-escaped and the base64 cores."""
    forms: set[bytes] = set()
    for value in values:
        forms |= {value} | url_forms(value) | json_forms(value) | base64_cores(value)
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


def wire_values(value: bytes) -> set[bytes]:
    """How the gate may put `value` on the wire (routing.build_route), where it differs from the value:
    percent-encoded for query auth (`quote(secret, safe="")`), base64 for basic auth (`Basic <b64>`; the
    scheme word is no secret). Bearer and header auth send the value itself, `Bearer ` before it, whose
    forms the value's own are. Derived from every value, whatever its credential's auth type: the cost is a
    form or a few (none for a value percent-encoding leaves alone and whose base64 holds no `+`, `/`, `=`)."""
    return {quote_from_bytes(value, safe="").encode(), base64.b64encode(value)} - {value}


def redaction_forms(values: Iterable[bytes]) -> set[bytes]:
    """What response redaction replaces: the search forms plus whole base64 encodings with their edges, and
    the URL-encodings of each wire value (a wire value as it is already is one: the value's URL-encoding or base64)."""
    values = tuple(values)
    forms = search_forms(values)
    for value in values:
        forms |= base64_whole(value)
        for wire in wire_values(value):
            forms |= url_forms(wire)
    return {f for f in forms if len(f) >= MIN_SECRET_LENGTH}


def _lower_hex(encoded: bytes) -> bytes:
    parts = encoded.split(b"%")
    return parts[0] + b"".join(b"%" + p[:2].lower() + p[2:] for p in parts[1:])
