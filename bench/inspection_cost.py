"""`python -m bench.inspection_cost`: what body inspection and response redaction cost per request.

Times the pure hot-path pieces the gate runs for a credential in `warn`/`block` mode, with 100 and
1,000 vault secrets in the table: the table build (compiling every secret's search forms), a scan
of a small GET's path, query and headers, a scan of a 64 KiB JSON body (plain, and with JSON and
percent escapes that trigger the decoded views), and redacting a 64 KiB response in 4 KiB and in
SSE-sized chunks. Prints microseconds; no thresholds (see docs/inspection.md for the numbers).
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
from collections.abc import Callable

from aegisd.inspection import Inspector, SecretSource
from tests.inspection_samples import clean_corpus


def best_us(func: Callable[[], object], repeat: int = 7, number: int = 20) -> float:
    """Median of `repeat` runs of `number` calls, in CPU microseconds per call (steadier on a busy host)."""
    runs = []
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            func()
        runs.append((time.process_time() - start) / number * 1e6)
    return statistics.median(runs)


def body_64k(escaped: bool) -> bytes:
    """64 KiB of a chat request: GitHub JSON, UUIDs, prose; the escaped variant adds percent-encoding and
    a `\\/` (as PHP-style encoders write), which make the inspector scan a decoded view as well."""
    corpus = clean_corpus()
    parts = [corpus[name].decode() for name in ("github_issue", "openai_chat", "uuid_list", "lorem_ipsum")]
    text = "\n".join(parts) * 4
    if escaped:
        text = text[:1000] + " caf\u00e9 https%3A%2F%2Fexample.com/a/b" + text[1000:]
    body = json.dumps({"input": text[: 62 * 1024]})
    return (body.replace("/", "\\/") if escaped else body).encode()[: 64 * 1024]


def report(count: int, get_parts: dict[str, bytes], plain: bytes, escaped: bytes, stream_body: bytes,
           event_size: int) -> None:
    """Build a table of `count` random secrets and print what each hot-path piece costs with it."""
    sources = [SecretSource(f"c{i}", (secrets.token_urlsafe(30).encode(),)) for i in range(count)]
    start = time.process_time()
    inspector = Inspector(sources)
    build_ms = (time.process_time() - start) * 1000
    redaction = inspector.redaction("c0")
    assert redaction is not None

    def redact(chunk: int) -> None:
        redactor = redaction.stream()
        for pos in range(0, len(stream_body), chunk):
            redactor.feed(stream_body[pos:pos + chunk])
        redactor.finish()

    rows: list[tuple[str, Callable[[], object]]] = [
        ("small GET (path, query, headers) scan", lambda: inspector.scan_each(get_parts)),
        ("64 KiB JSON body scan", lambda: inspector.scan(plain)),
        ("64 KiB body with escapes (views)", lambda: inspector.scan(escaped)),
        ("redact 64 KiB response, 4 KiB chunks", lambda: redact(4096)),
        ("redact 64 KiB response, SSE events", lambda: redact(event_size)),
    ]
    print(f"{count:5d} secrets: table build {build_ms:8.1f} ms")
    for label, func in rows:
        print(f"      {label:<40} {best_us(func, number=5):8.1f} us")


def main() -> None:
    plain, escaped = body_64k(False), body_64k(True)
    get_parts = {"path": b"/repos/acme/app/issues/1347/comments",
                 "query string": b"per_page=100&page=2&sort=created",
                 "headers": b"Accept: application/vnd.github+json\nUser-Agent: agent/1.0\n"
                            b"X-Request-Id: 5f0c2a9e1b7d4c3a"}
    event = b"data: " + plain[:200] + b"\n\n"
    stream_body = event * (64 * 1024 // len(event))
    print(f"body {len(plain)} B (escaped variant {len(escaped)} B), response {len(stream_body)} B; CPU time")
    for count in (100, 1000):
        report(count, get_parts, plain, escaped, stream_body, len(event))

if __name__ == "__main__":
    main()
