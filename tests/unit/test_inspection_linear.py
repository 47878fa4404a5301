"""Found by a cold review: the private-key pattern backtracked catastrophically (about N^4 on `a: `
repeated after a PEM header: 509 bytes took 7.6 s), and it runs on the event loop for every request's path,
query and headers, even a tokenless one while the vault is locked. Every key format must do work that grows
linearly with the data, whatever the data.

That is checked by `python -m bench.inspection_linear`, which times every crafted case at 1 KiB and 16 KiB:
unit tests assert no times, and the work that matters (the regex engine's backtracking inside one `re` call)
is not one anything outside the engine can count. What stays here is what the rewritten pattern must still
find, and that a near miss is no match; a CPU-time guard turns a scan that never ends into a failure rather
than a hang (it bounds nothing a linear scan comes near: one of these takes well under a millisecond).
"""

from __future__ import annotations

from aegisd.inspection import key_formats
from aegisd.inspection.key_formats import find_key_formats
from bench.inspection_linear import cpu_guard


def test_pem_keys_are_still_found_in_every_layout() -> None:
    """What the rewritten pattern must keep finding: raw, CRLF, JSON-escaped, indented, flattened onto one line
    by spaces, with RFC 1421 headers and PGP armour headers."""
    key = b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7" * 2
    encrypted = (b"-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
                 b"DEK-Info: AES-128-CBC,0123456789ABCDEF0123456789ABCDEF\n\n" + key)
    pgp = (b"-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2.0.22 (GNU/Linux)\n"
           b"Comment: GPGTools - https://gpgtools.org\n\n" + key)
    for pem in (encrypted, pgp, b"-----BEGIN OPENSSH PRIVATE KEY-----\n" + key):
        for layout in (pem, pem.replace(b"\n", b"\r\n"), pem.replace(b"\n", b"\\n"), pem.replace(b"\n", b"\\r\\n"),
                       pem.replace(b"\n", b"\n        "), pem.replace(b"\n", b" ")):
            assert find_key_formats(b'{"k": "' + layout + b'"}') == {"private_key"}, layout
    for near_miss in (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN PRIVATE KEY-----\na: " + b"a: " * 400):
        with cpu_guard("a near miss"):
            assert find_key_formats(near_miss) == set(), near_miss[:60]


def test_near_keys_by_the_hundred_cost_no_python_call_each_and_are_not_taken_for_keys() -> None:
    """Found by a cold review: `a://b:c@` repeated matched the connection-URL pattern every 8 bytes, each match
    then turned down in Python (a one-letter scheme after an `@`): 17 s of CPU for 10 MiB with its decoded views.
    Past REJECTED_MAX such matches the scan goes on with the strict pattern, which turns those down itself; ids
    like `task-<32 hex>` (its review: a first cap took 300 of them for an OpenAI key) are still no key. Only data
    crafted past the strict pattern's checks too counts as holding the format."""
    many = key_formats.REJECTED_MAX * 3
    assert find_key_formats(b"a://b:c@" * many) == set()
    assert find_key_formats(b" ".join(b"task-%032x" % n for n in range(many))) == set()
    assert find_key_formats(b" 1b://b:c@h" * many) == {"connection_url"}  # a scheme starts with a letter
    assert find_key_formats(b"a://b:c@" * many + b" db://user:realpass@host") == {"connection_url"}
    assert find_key_formats(b"task-%032x " % 7 * many + b"\\\\nsk-" + b"A" * 40) == set()  # `\\\\n`: no escape
    assert find_key_formats(b"task-%032x " % 7 * many + b"\\nsk-" + b"A" * 40) == {"openai_key"}  # JSON `\\n`
    # Past the cap, prefixes the finder passes that start no match (its review: a Python call each, uncounted) are
    # bounded too: past MISSES_MAX the strict pattern takes over, and a key after them is still found
    glued = b"xsk-" + b"A" * 40 + b" "
    misses = b" sk-x" * (key_formats.MISSES_MAX + 10)
    assert find_key_formats(glued * many + misses) == set()
    assert find_key_formats(glued * many + misses + b" sk-" + b"B" * 48) == {"openai_key"}
