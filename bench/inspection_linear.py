"""`python -m bench.inspection_linear`: every key format scans crafted data in time linear in its length.

Found by a cold review: the private-key pattern backtracked catastrophically (about N^4 on `a: ` repeated
after a PEM header: 509 bytes took 7.6 s), and it runs on the event loop for every request's path, query and
headers, even a tokenless one while the vault is locked. Every key format must do work that grows linearly
with the data, whatever the data.

A perf check rather than a unit test (unit tests assert no times): the work that matters here is the regex
engine's backtracking inside one `re` call, which nothing outside the engine can count. No wall-clock limits:
each input is timed at 1 KiB and at 16 KiB in the same run, and the ratio must stay far below a quadratic's
256 (linear is about 16). A CPU-time guard turns a scan that never ends into a failure. Prints each case's
ratio with PASS or FAIL, and exits 1 if any failed.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


class TooSlow(Exception):
    pass


@contextmanager
def cpu_guard(what: str) -> Iterator[None]:
    """Fail instead of hanging when a scan burns GUARD_CPU_S of CPU (the regex engine checks for signals)."""
    def expire(_signum: int, _frame: object) -> None:
        raise TooSlow(f"{what}: still scanning after {GUARD_CPU_S} s of CPU: super-linear")

    previous = signal.signal(signal.SIGVTALRM, expire)
    signal.setitimer(signal.ITIMER_VIRTUAL, GUARD_CPU_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def cpu_per_call(scan: Callable[[bytes], object], data: bytes) -> float:
    """CPU seconds per call: the least over three rounds, each long enough (1 ms) to time reliably."""
    best = float("inf")
    for _ in range(3):
        calls, start = 0, time.process_time()
        while (elapsed := time.process_time() - start) < 0.001 or not calls:
            scan(data)
            calls += 1
        best = min(best, elapsed / calls)
    return best


def check(name: str) -> tuple[bool, str]:
    """Whether `name`'s case scans in linear time, through find_key_formats (its one-by-one prefix confirmation
    for a few occurrences, every format's whole-data scan for many), and what was measured."""
    make = CASES[name]
    try:
        with cpu_guard(name):
            small = cpu_per_call(find_key_formats, make(SMALL))
            large = cpu_per_call(find_key_formats, make(LARGE))
    except TooSlow as exc:
        return False, str(exc)
    ratio = large / small
    return ratio < RATIO_MAX, f"16x the data took {ratio:5.1f}x the time ({small * 1e6:7.1f} -> {large * 1e6:8.1f} us)"


def main() -> None:
    print(f"find_key_formats, CPU time per call at {SMALL} and {LARGE} bytes; FAIL at a ratio of {RATIO_MAX} or more")
    failed = 0
    for name in sorted(CASES):
        ok, measured = check(name)
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<45} {measured}")
    print(f"{len(CASES) - failed} of {len(CASES)} cases linear")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
