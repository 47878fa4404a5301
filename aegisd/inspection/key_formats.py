"""Well-known API key formats: a family name each, and a pattern tight enough for clean traffic.

Every pattern starts with one of its declared literal prefixes. One Hyperscan pass finds every
prefix occurrence, and each pattern runs only there, in the order `finditer` would try them, so the
matches are exactly a `finditer` scan's (a regex scan per format costs ~50 µs per 64 KiB; nine of them
were most of a large body's inspection). The boundary before a key (no token character, so `task-…`
or the inside of a base64url blob never count) is checked in Python: a leading look-behind would
defeat the regex engine's literal-prefix scan in the whole-data fallback. A JSON escape of a control or non-ASCII
character right before a key (`\\nsk-…`) counts as no token character, as the character it stands for, when its
backslash is not itself escaped (`\\\\nsk-…` is a backslash and the text `nsk-…`).

Every pattern is bounded: a match attempt reads at most a few KiB past where it starts (runs of key
characters past 512 are not keys), so the whole-data fallback scans large data in windows, each one
`re` call of bounded cost: `re` holds the GIL, and a body inspected in a worker thread must leave the
event loop its turn (one call over 10 MiB crafted full of `sk-` took a second).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aegisd.inspection.literal_matcher import LiteralScanner
from aegisd.inspection.views import backslashes_before

TOKEN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
FAMILIES = ("anthropic_key", "openai_key", "github_token", "slack_token", "aws_access_key", "google_api_key",
            "stripe_key", "private_key", "connection_url", "aegis_agent_token")

# A JSON escape right before a key that stands for no token character though it ends in a letter or hex digit:
# a control character's (`\n`) or a non-ASCII one's (`\u00e9`, `\u4e2d`). views.py leaves such escapes in data
# that holds no other kind (a JSON body whose only escapes are `\n` and `\"`), so a key after one stands alone.
# Only an escape, though: after an even number of backslashes (`dir\\nsk-…`, the text `dir\nsk-…`, one token).
_ESCAPE_BEFORE = re.compile(rb"\\(?:[bfnrt]|u(?!00[0-7])[0-9A-Fa-f]{4})\Z")
_SCHEME_BEFORE = re.compile(rb"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{1,31}\Z")
_SCHEME_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+.-")
# Passwords in connection URLs that are templates or documentation, not secrets. The connection-URL
# pattern refuses them itself (a data crafted full of `ab://u:****@h` made a Python call per match);
# within a password, `[^}]` cannot reach past its end, nor any run past its 512 bytes.
_PASSWORD = rb"[^\s/?#@\"'<>\\]"
_PLACEHOLDERS = (rb"\$\{[^}\s/?#@\"'<>\\]{0,512}\}|\$[A-Z_][A-Z0-9_]{0,512}|\{\{[^}\s/?#@\"'<>\\]{0,512}\}\}"
                 rb"|%\([a-z_]{1,512}\)s|[*xX.]{1,512}|(?i:password|passwd|pass|pwd|pw|secret|changeme)")
_PLACEHOLDER = re.compile(_PLACEHOLDERS)
# Checked before the placeholders: most `://` are followed by no password at all.
_PASSWORD_AT = rb"(?=" + _PASSWORD + rb"{1,512}@[A-Za-z0-9\[])"


# The private-key pattern's parts. Every repeat is possessive (it never gives back what it took) and
# bounded, and no two adjacent ones can take the same text, so a match attempt is one pass over at most
# a few KiB: the earlier `[^\r\n\\]*(?:\s|\\[rn])+` repeated {0,4} could split a line of `a: a: a: ` in
# ~N^4 ways, and 509 bytes of it held the event loop for 7.6 s. A header value stops before `-----`,
# so an attempt never reads on through the next `-----BEGIN` (whose own attempt reads that text).
_PEM_GAP = rb"(?:\s|\\[rn]){1,64}+"  # line breaks, raw or JSON-escaped, and indentation
_PEM_HEADER = rb"[A-Za-z\-]{1,64}+: "  # Proc-Type: , DEK-Info: , Version: , Comment: ...
_PEM_KEY = rb"[A-Za-z0-9+/=]{40}"
# A header value: words, single dashes, and the spaces between words unless the next header or the key
# material follows them (a PEM whose line breaks were flattened into spaces).
_PEM_VALUE = (rb"(?:[^\s\\\-]{1,32}+|-(?!----)|[ \t\x0b\x0c]{1,16}+(?!" + _PEM_HEADER + rb"|" + _PEM_KEY
              + rb")){0,32}+")


@dataclass(frozen=True, slots=True)
class KeyFormat:
    """One scan: families are the pattern's named groups; `before` says what may precede a match."""

    pattern: re.Pattern[bytes]
    prefixes: tuple[bytes, ...]  # every match begins with one of these (find_key_formats' prefilter)
    before: str = "boundary"  # "boundary": no token byte; "any"; "scheme": a URL scheme, for ://


FORMATS: tuple[KeyFormat, ...] = (
    # sk-ant-api03-…, sk-proj-…, sk-svcacct-…, legacy sk-<48 alnum>; "sk-learn" is far too short.
    KeyFormat(re.compile(rb"sk-(?:(?P<anthropic_key>ant-[a-z]{2,10}[0-9]{2}-[A-Za-z0-9_\-]{32,512})"
                         rb"|(?P<openai_key>(?:proj|svcacct|admin)-[A-Za-z0-9_\-]{32,512}"
                         rb"|[A-Za-z0-9]{32,512}(?![A-Za-z0-9_\-])))"), (b"sk-",)),
    KeyFormat(re.compile(rb"gh(?P<github_token>[pousr]_[A-Za-z0-9]{36,251}(?![A-Za-z0-9_]))"),
              (b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_")),
    KeyFormat(re.compile(rb"github_pat_(?P<github_token>[A-Za-z0-9_]{50,255})"), (b"github_pat_",)),
    KeyFormat(re.compile(rb"xox(?P<slack_token>[abprs]-[0-9]{6,64}-[A-Za-z0-9\-]{10,512})"),
              (b"xoxa-", b"xoxb-", b"xoxp-", b"xoxr-", b"xoxs-")),
    KeyFormat(re.compile(rb"(?P<aws_access_key>(?:AKIA|ASIA)[A-Z0-9]{16})(?![A-Za-z0-9])"),
              (b"AKIA", b"ASIA")),
    KeyFormat(re.compile(rb"AIza(?P<google_api_key>[A-Za-z0-9_\-]{35})(?![A-Za-z0-9_\-])"), (b"AIza",)),
    # Live keys only: test-mode keys move no money and appear in docs and fixtures everywhere.
    KeyFormat(re.compile(rb"sk_live_(?P<stripe_key>[A-Za-z0-9]{20,512})"), (b"sk_live_",)),
    KeyFormat(re.compile(rb"rk_live_(?P<stripe_key>[A-Za-z0-9]{20,512})"), (b"rk_live_",)),
    # A header alone may be documentation; require key material after it (JSON-escaped newlines too).
    KeyFormat(re.compile(rb"-----BEGIN (?P<private_key>(?:[A-Z0-9]{1,32}+ ){0,3}PRIVATE KEY(?: BLOCK)?-----"
                         + _PEM_GAP + rb"(?:" + _PEM_HEADER + _PEM_VALUE + _PEM_GAP + rb"){0,4}+" + _PEM_KEY + rb")"),
              (b"-----BEGIN ",), before="any"),
    # Aegis's own agent tokens (aegisd/agents.py new_token: the prefix and 32 random bytes, base64url): one
    # written into a request is leaving for somewhere else, and one in a path must never reach the ledger or
    # a webhook receiver (an agent misconfigured to put its token in the URL gets 401, with the path recorded).
    KeyFormat(re.compile(rb"aegis_(?P<aegis_agent_token>[A-Za-z0-9_\-]{43})(?![A-Za-z0-9_\-])"), (b"aegis_",)),
    # scheme://user:password@host with a non-empty password that is no placeholder (the user may be empty:
    # redis://:pw@host).
    KeyFormat(re.compile(rb"://(?P<connection_url>[^\s:/?#@\"'<>\\]{0,512}:" + _PASSWORD_AT
                         + rb"(?!(?:" + _PLACEHOLDERS + rb")@)(" + _PASSWORD + rb"{1,512})@[A-Za-z0-9\[])"),
              (b"://",), before="scheme"),
)


# The most prefix occurrences confirmed one by one; past that (data crafted full of `://` or `sk-`) the
# Hyperscan pass stops and each format's regex scans the data once, as cheap per byte as ever and with
# at most this many Python calls spent first.
PREFILTER_MAX = 64
# The whole-data fallback runs each regex over windows of the data: attempts that start in a window of
# WINDOW bytes, in one `re` call over it and the OVERLAP bytes after it, which hold all an attempt
# starting in the window can read (the longest match and a look-ahead past it; a unit test checks).
# The result is exactly one `finditer` over the whole data's.
WINDOW = 64 * 1024
OVERLAP = 5 * 1024 + 256
# Matches of one format turned down by the look before them (a connection URL's scheme, a key's boundary) in one
# whole-data scan. Each costs a Python call: data full of them (`a://b:c@` repeated, a match every 8 bytes) cost
# 0.3 s a MiB, per decoded view; ids like `task-<32 hex>` hold `sk-` and 32 characters after a word. Past this
# many, the rest is searched only where a look-behind in the regex engine lets a match through (_strict_finder); past as
# many turned down there too, the data is taken to hold the format (only data crafted for it gets there: `\\nsk-`
# and a key, a backslash pair before each).
REJECTED_MAX = 256
# Prefixes the strict finder passes that start no match at all (` sk-` and a short word), each a Python call too;
# past this many, the plain pattern scans the rest again (a literal search, a Python call only per match), and
# past REJECTED_MAX of its matches turned down, the data is taken to hold the format. (A look-behind before the
# whole pattern would cost no Python call per candidate, but it has no literal to search for: 100 ns a byte.)
MISSES_MAX = 4096
# Per format, the families its matches can name: once all are found, the rest of its scan can be skipped.
_FAMILIES_OF = tuple(frozenset(fmt.pattern.groupindex) for fmt in FORMATS)


def _look_behind(before: str, after: bytes) -> bytes | None:
    """What `_accepted` checks before a match, as far as a fixed-width look-behind can (behind `after`):
    no token byte before a key, or a JSON escape that may stand for none; two scheme bytes before `://`."""
    if before == "boundary":
        return (rb"(?:(?<![A-Za-z0-9_\-]" + after + rb")|(?<=\\[bfnrt]" + after + rb")|(?<=\\u[0-9A-Fa-f]{4}"
                + after + rb"))")
    if before == "scheme":
        return rb"(?<=[A-Za-z0-9+.\-]{2}" + after + rb")"
    return None


def _strict_finder(fmt: KeyFormat) -> re.Pattern[bytes] | None:
    """A format's search past REJECTED_MAX: its prefixes, then the look-behind (the search is still for a literal);
    None for a format no match of which is ever turned down."""
    prefixes = b"(?:" + b"|".join(map(re.escape, fmt.prefixes)) + b")"  # each format's are of one length
    behind = _look_behind(fmt.before, prefixes)
    return re.compile(prefixes + behind) if behind is not None else None


_STRICT = tuple(_strict_finder(fmt) for fmt in FORMATS)
# Hyperscan literal id -> (index into FORMATS, prefix length).
_PREFIXES = tuple((index, len(prefix)) for index, fmt in enumerate(FORMATS) for prefix in fmt.prefixes)
_PREFIX_SCANNER = LiteralScanner([prefix for fmt in FORMATS for prefix in fmt.prefixes])


def find_key_formats(data: bytes) -> set[str]:
    """The families of every well-known key format in `data` (empty for clean traffic)."""
    hits: list[tuple[int, int]] = []
    if not _PREFIX_SCANNER.scan(data, _note, hits):
        return _scan_whole(data)
    found: set[str] = set()
    resume = [0] * len(FORMATS)  # per format, where `finditer` would search next: after its last match
    for start, index in sorted(hits):
        if start < resume[index]:
            continue
        fmt = FORMATS[index]
        match = fmt.pattern.match(data, start)
        if match is not None:
            resume[index] = match.end()
            _add(found, fmt, match, data)
    return found


def _note(prefix_id: int, _from: int, end: int, _flags: int, hits: list[tuple[int, int]]) -> bool:
    """Hyperscan's callback: record (start, format index); stop once there are too many to confirm one by one."""
    index, size = _PREFIXES[prefix_id]
    hits.append((end - size, index))
    return len(hits) > PREFILTER_MAX


def _scan_whole(data: bytes) -> set[str]:
    found: set[str] = set()
    for fmt, strict, families in zip(FORMATS, _STRICT, _FAMILIES_OF, strict=True):
        stopped = _scan_windows(data, 0, fmt, families, found)
        if stopped is not None and strict is not None:
            _scan_strict(data, stopped, fmt, strict, families, found)
    return found


def _scan_windows(data: bytes, start: int, fmt: KeyFormat, families: frozenset[str], found: set[str]) -> int | None:
    """Judge each match of the format from `start` on, in windows; where it stopped past REJECTED_MAX turned-down
    matches, or None once it ran to the end or every family of the format was found."""
    size, rejected = len(data), 0
    while start < size and not families <= found:
        stop = start + WINDOW  # this round's attempts start before here
        resume = stop
        for match in fmt.pattern.finditer(data, start, min(size, stop + OVERLAP)):
            if match.start() >= stop:
                break
            resume = max(stop, match.end())
            if not _add(found, fmt, match, data):
                rejected += 1
                if rejected > REJECTED_MAX:
                    return match.end()
        start = resume
    return None


def _scan_strict(data: bytes, start: int, fmt: KeyFormat, finder: re.Pattern[bytes], families: frozenset[str],
                 found: set[str]) -> None:
    """The rest of one format's scan past REJECTED_MAX turned-down matches: at the prefixes the strict finder
    passes, a Python call each, then (past MISSES_MAX of them that start no match) the plain pattern again. Past
    REJECTED_MAX turned down again, the data is taken to hold the format."""
    rejected = resume = misses = 0
    for candidate in finder.finditer(data, start):
        at = candidate.start()
        if at < resume:
            continue
        match = fmt.pattern.match(data, at)
        if match is None:
            misses += 1
            if misses > MISSES_MAX:
                if _scan_windows(data, at, fmt, families, found) is not None:
                    found |= families
                return
            continue
        resume = match.end()
        if _add(found, fmt, match, data):
            if families <= found:
                return
            continue
        rejected += 1
        if rejected > REJECTED_MAX:
            found |= families
            return


def _add(found: set[str], fmt: KeyFormat, match: re.Match[bytes], data: bytes) -> bool:
    """Add the match's family unless the look before it turns it down (False then)."""
    family = match.lastgroup
    if family is None or family in found:
        return True
    if not _accepted(fmt, match, data):
        return False
    found.add(family)
    return True


def _accepted(fmt: KeyFormat, match: re.Match[bytes], data: bytes) -> bool:
    start = match.start()
    if fmt.before == "boundary":
        if start == 0 or data[start - 1] not in TOKEN_BYTES:
            return True
        escape = _ESCAPE_BEFORE.search(data, max(0, start - 6), start)
        return escape is not None and backslashes_before(data, 0, escape.start()) % 2 == 0
    if fmt.before == "scheme":  # a scheme right before (the pattern refused placeholder passwords)
        if start == 0 or data[start - 1] not in _SCHEME_BYTES:
            return False
        return _SCHEME_BEFORE.search(data, max(0, start - 33), start) is not None
    return True
