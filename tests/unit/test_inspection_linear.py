"""Found by a cold review: the private-key pattern backtracked catastrophically (about N^4 on `a: `
repeated after a PEM header: 509 bytes took 7.6 s), and it runs on the event loop for every request's path,
query and headers, even a tokenless one while the vault is locked. Every key format must do work that grows
linearly with the data, whatever the data.

No wall-clock limits: each input is timed at 1 KiB and at 16 KiB in the same run, and the ratio must stay far
below a quadratic's 256 (linear is about 16). A CPU-time guard turns a scan that never ends into a failure.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from aegisd.inspection.key_formats import FORMATS, find_key_formats

SMALL, LARGE = 1024, 16 * 1024
RATIO_MAX = 64  # linear: ~16; quadratic: 256; the old private-key pattern: never finished
GUARD_CPU_S = 5.0  # a linear scan of 16 KiB takes about a millisecond


def _repeat(head: bytes, unit: bytes, tail: bytes = b"") -> Callable[[int], bytes]:
    """`head`, then `unit` repeated to about `size` bytes, then `tail`."""
    return lambda size: head + unit * max(1, (size - len(head)) // len(unit)) + tail


PEM = b"-----BEGIN PRIVATE KEY-----"
# The worst repeats found for each format: a prefix over and over, a prefix followed by almost a key, and
# for the private key every run its pattern has (header values, gaps, names, words) made long or repeated.
CRAFTED: dict[str, Callable[[int], bytes]] = {
    "pem 'a: ' after the header (the review's)": _repeat(PEM + b"\n", b"a: ", b"!"),
    "pem 'a: ' after the header, JSON-escaped": _repeat(PEM + b"\\n", b"a: ", b"!"),
    "pem 'a: ' after a space": _repeat(PEM + b" ", b"a: "),
    "pem header and 'a: ' on one line, repeated": _repeat(b"", PEM + b" a: "),
    "pem header and 'a: x' lines, repeated": _repeat(b"", PEM + b"\na: x\n"),
    "pem spaces in a header value": _repeat(PEM + b"\na: ", b" ", b"!"),
    "pem tabs and spaces": _repeat(PEM + b"\na: x", b" \t", b"!"),
    "pem escaped line breaks": _repeat(PEM, b"\\r\\n", b"!"),
    "pem dashes in a value": _repeat(PEM + b"\na: ", b"-x"),
    "pem four dashes in a value": _repeat(PEM + b"\na: ", b"----x"),
    "pem words of almost a key": _repeat(PEM + b"\na: ", b"x" * 39 + b" "),
    "pem header-like words": _repeat(PEM + b"\na: ", b"b: "),
    "pem long header names": _repeat(b"", PEM + b"\n" + b"-a" * 40),
    "pem long header lines": _repeat(b"", PEM + b"\na: " + b"x" * 300 + b"\n"),
    "pem words before PRIVATE": _repeat(b"", b"-----BEGIN A B C "),
    "pem upper-case runs": _repeat(b"", b"-----BEGIN " + b"A" * 50),
    "sk- almost a key": _repeat(b"", b"sk-" + b"a" * 31 + b"_ "),
    "sk-ant- almost a key": _repeat(b"", b"sk-ant-ab12-" + b"a" * 20 + b" "),
    "sk- run ending in a dash": _repeat(b"", b"sk-" + b"a" * 60 + b"- "),
    "ghp_ run ending in an underscore": _repeat(b"", b"ghp_" + b"a" * 40 + b"_ "),
    "xoxb- digits without a dash": _repeat(b"", b"xoxb-" + b"1" * 30 + b" "),
    "AKIA run": _repeat(b"", b"AKIA" + b"A" * 17 + b" "),
    "connection url user runs": _repeat(b"", b"a://" + b"u" * 30 + b" "),
    "connection url colons": _repeat(b"a://u", b":"),
    "connection url placeholders": _repeat(b"", b"ab://u:****@h "),
    "connection url without a scheme": _repeat(b"", b"_://u:pw@h "),
}
CASES = {**CRAFTED, **{f"{prefix.decode()} repeated": _repeat(b"", prefix)
                       for fmt in FORMATS for prefix in fmt.prefixes}}


class _TooSlow(Exception):
    pass


@contextmanager
def _cpu_guard(what: str) -> Iterator[None]:
    """Fail instead of hanging when a scan burns GUARD_CPU_S of CPU (the regex engine checks for signals)."""
    def expire(_signum: int, _frame: object) -> None:
        raise _TooSlow(f"{what}: still scanning after {GUARD_CPU_S} s of CPU: super-linear")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, GUARD_CPU_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def _cpu_per_call(scan: Callable[[bytes], object], data: bytes) -> float:
    """CPU seconds per call: the least over three rounds, each long enough (1 ms) to time reliably."""
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.process_time()
        while (elapsed := time.process_time() - start) < 0.001 or not calls:
            scan(data)
            calls += 1
        best = min(best, elapsed / calls)
    return best


@pytest.mark.parametrize("name", sorted(CASES))
def test_key_formats_scan_in_linear_time(name: str) -> None:
    """Through find_key_formats: its one-by-one prefix confirmation for a few occurrences, every format's
    whole-data scan for many."""
    make = CASES[name]
    with _cpu_guard(name):
        small = _cpu_per_call(find_key_formats, make(SMALL))
        large = _cpu_per_call(find_key_formats, make(LARGE))
    assert large / small < RATIO_MAX, f"{name}: 16x the data took {large / small:.0f}x the time"


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
        with _cpu_guard("a near miss"):
            assert find_key_formats(near_miss) == set(), near_miss[:60]
