"""Path patterns, matched with RE2: time linear in the path's length, whatever the pattern.

The gate judges policies on its event loop, before rate limits, on paths an agent chooses (up to
~64 KiB). Python's backtracking `re` takes quadratic or exponential time on ordinary-looking patterns
(`/repos/.*/.*/issues` against a long path that never matches), so one governed agent could stall
every agent's requests. RE2 (the `google-re2` package) never backtracks; how long a path is judged is
bounded too (JUDGING_BUDGET below), since linear in the path is still proportional to the patterns' size.

It has no fallback: a construct RE2 cannot run in linear time (backreferences, lookarounds, atomic
groups, possessive quantifiers, conditionals) is an error, which makes the policy file invalid
(it fails closed), never a silent switch to `re`. `_require_re2` checks this at import, so a
different module named `re2` that does fall back is refused.

Semantics, as the docs say: full match (anchored at both ends); `.` does not match a newline; `\\d`,
`\\w`, `\\s` and `\\b` are ASCII-only (Python's are Unicode), so the narrow classes match less and their
negations (`\\D`, `\\W`, `\\S`) more; `\\p{Nd}` and `\\pL` name Unicode classes. A brace that Python reads
as a repetition and RE2 as literal text (`{,3}`, `{,}`, or a count too large for RE2) is refused, so no
pattern written for Python silently changes meaning that way.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import re2

# What `quote` shows as an escape: C0 and C1 controls, DEL, line/paragraph separators, bidi controls and
# lone surrogates (which UTF-8, so the control API and the log, cannot carry). The rest, backslashes
# included, is quoted as written.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A),
                                           *range(0xD800, 0xE000))})


def quote(text: str) -> str:
    """`text` in single quotes as the user wrote it (`'/a\\Z'`, not repr's `'/a\\\\Z'`), with only the characters
    that must not reach a terminal or a log line shown as escapes."""
    return "'" + text.translate(_ESCAPES) + "'"


# RE2 refuses repetition counts above this.
MAX_REPEAT = 1000
# RE2 parses some malformed patterns in time quadratic in their length (`[[:` repeated: half a second at
# 64 KiB); a path pattern longer than this is refused before RE2 sees it.
MAX_PATTERN_LENGTH = 8192
# Linear is not cheap: a path an agent crafts can make RE2 build a new DFA state at every byte, each costing up to the
# size of the patterns' programs (`/.*a.{1000}x`, 8,015 instructions, held the loop 6.8 s on a 64 KiB path). So the
# work of judging one request is bounded: its path's length in bytes times the program sizes of all the patterns it
# may be matched against stays within JUDGING_BUDGET (10 to 25 ns a unit: crafted paths took at most ~55 ms), and
# no path over MAX_JUDGED_PATH bytes is judged (8 KiB, what nginx and Apache accept in a request line by default).
JUDGING_BUDGET = 4 * 1024 * 1024
MAX_JUDGED_PATH = 8192
# One pattern alone must leave paths of 256 bytes judgeable: a bigger program (`\pL{1,64}`, `.{1000}` thrice) is
# refused at validation, rather than loaded to judge nearly no path. (Ordinary counted repetitions such as two
# `[^/]{1,255}` segments, 4,598 instructions, pass, and judge paths up to 912 bytes.)
MAX_PROGRAM_SIZE = JUDGING_BUDGET // 256


class PatternError(ValueError):
    """A pattern aegisd cannot match; the message says why (for a policy issue)."""


class PathPattern:
    """One compiled `rules[].paths` entry; `size` is its RE2 program's, what matching may cost per byte."""

    __slots__ = ("_regexp", "size", "text")

    def __init__(self, text: str, regexp: Any) -> None:
        self.text = text
        self._regexp = regexp
        self.size: int = regexp.programsize

    @property
    def regexp(self) -> Any:
        """The RE2 object (for tests and introspection)."""
        return self._regexp

    def fullmatch(self, path: bytes) -> bool:
        """Whether the pattern matches all of `path` (UTF-8, as `encode_path` gives it)."""
        return self._regexp.fullmatch(path) is not None

    def __repr__(self) -> str:
        return f"PathPattern({self.text!r})"


class PathSet:
    """A rule's patterns as one RE2 set (`re2.Set`, anchored at both ends): a single pass over the path says
    whether any of them matches, as fast as Python's re on one pattern, where a call per pattern through the
    `re2` module's match objects cost about 2.5 us each. Iterates over its PathPatterns; `size` sums their
    programs. Patterns RE2 cannot compile together (about 8 near MAX_PROGRAM_SIZE) are refused: the path would be
    judged against so many that only a few bytes of it could be (pattern.judged_length)."""

    __slots__ = ("_set", "patterns", "size")

    def __init__(self, patterns: tuple[PathPattern, ...]) -> None:
        self.patterns = patterns
        self.size = sum(pattern.size for pattern in patterns)
        try:
            self._set = _full_match_set(patterns)
        except re2.error:
            raise PatternError(f"the rule's {len(patterns)} patterns are more than RE2 can compile together; "
                               "shorten them, or split them over several rules") from None

    def matches(self, path: bytes) -> bool:
        """Whether some pattern matches all of `path` (UTF-8, as `encode_path` gives it)."""
        return self._set.Match(path) is not None

    def __iter__(self) -> Iterator[PathPattern]:
        return iter(self.patterns)

    def __len__(self) -> int:
        return len(self.patterns)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathSet) and [p.text for p in self.patterns] == [p.text for p in other.patterns]

    def __hash__(self) -> int:
        return hash(tuple(p.text for p in self.patterns))

    def __repr__(self) -> str:
        return f"PathSet({[p.text for p in self.patterns]!r})"


def _full_match_set(patterns: tuple[PathPattern, ...]) -> Any:
    """An RE2 set of `patterns`, each anchored at both ends; re2.error if RE2 cannot compile them together."""
    matcher = re2.Set.FullMatchSet(_options())
    for pattern in patterns:
        matcher.Add(pattern.text)
    matcher.Compile()
    return matcher


def judged_length(program_size: int) -> int:
    """The longest path, in bytes, judged against patterns whose programs add up to `program_size`; no limit when
    there are none (rules without `paths`): nothing is matched against the path then."""
    if program_size == 0:
        return sys.maxsize
    return min(MAX_JUDGED_PATH, JUDGING_BUDGET // program_size)


def encode_path(path: str) -> bytes:
    """The path as RE2 reads it. `surrogatepass`: a path with a lone surrogate still gets a verdict."""
    return path.encode("utf-8", "surrogatepass")


def _options() -> Any:
    options = re2.Options()
    options.never_capture = True  # only whether it matches: RE2's DFA alone answers, no submatch pass
    options.log_errors = False  # errors come back as exceptions, not lines on stderr
    return options


def compile_path(text: str) -> PathPattern:
    """Compile a path pattern, or raise PatternError saying what is wrong with it."""
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"the pattern is {len(text)} characters long; aegisd takes at most "
                           f"{MAX_PATTERN_LENGTH} (split it into several patterns)")
    _check_braces(text)
    try:
        regexp = re2.compile(text, _options())
    except re2.error as exc:
        raise PatternError(_explain(exc, text)) from None
    except Exception as exc:  # e.g. a lone surrogate that cannot be UTF-8: whatever it is, an issue
        raise PatternError(f"it cannot be compiled ({type(exc).__name__})") from None
    pattern = PathPattern(text, regexp)
    if pattern.size > MAX_PROGRAM_SIZE:
        raise PatternError(f"it compiles to {pattern.size} RE2 instructions and aegisd takes at most "
                           f"{MAX_PROGRAM_SIZE}, since matching a path may cost that many steps per byte: counted "
                           "repetitions such as \\pL{1,64}, or several .{1000}, multiply it; write + or * instead "
                           "(such as [^/]+), or split the pattern (see docs/policies.md#path-patterns)")
    return pattern


_UNSUPPORTED = (
    ("(?=", "a lookahead `(?=...)`"), ("(?!", "a negative lookahead `(?!...)`"),
    ("(?<=", "a lookbehind `(?<=...)`"), ("(?<!", "a negative lookbehind `(?<!...)`"),
    ("(?P=", "a backreference `(?P=name)`"), ("(?>", "an atomic group `(?>...)`"),
    ("(?(", "a conditional `(?(...)...)`"),
)
# Python flags and comments RE2 lacks (its error names the group up to the flag it stopped at), with what to write.
_PYTHON_ONLY = {
    "x": "RE2 has no verbose flag (?x): remove it, and the spaces and comments it allowed (without it a space matches "
         "a space)",
    "a": "RE2 has no (?a) flag: remove it; \\d, \\w, \\s and \\b are already ASCII-only in RE2",
    "u": "RE2 has no (?u) flag: remove it and write a Unicode class where you mean one (\\p{Nd}, \\pL, \\pN)",
    "L": "RE2 has no locale flag (?L): remove it (paths are matched as UTF-8)",
    "#": "RE2 has no comments (?#...): remove the comment",
}
_LINEAR = ("which RE2 cannot match in linear time; aegisd matches paths with RE2 (see "
           "docs/policies.md#path-patterns)")


def _explain(exc: Exception, text: str) -> str:
    raw = exc.args[0] if exc.args else ""
    message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    kind, _, fragment = message.partition(": ")
    if kind == "invalid perl operator":
        for prefix, what in _UNSUPPORTED:
            if fragment.startswith(prefix) or (fragment == "(?P" and prefix == "(?P=" and prefix in text):
                return f"it uses {what}, {_LINEAR}"
        if fragment.startswith("(?") and fragment[-1] in _PYTHON_ONLY:
            return _PYTHON_ONLY[fragment[-1]]
    if kind == "invalid escape sequence" and fragment[1:2] in tuple("123456789"):
        return f"it uses a backreference {quote(_short(fragment))}, {_LINEAR}"
    if kind == "bad repetition operator" and fragment.endswith("+") and len(fragment) == 2:
        return f"it uses a possessive quantifier {quote(fragment)}, {_LINEAR}"
    if kind == "invalid escape sequence" and fragment == "\\Z":
        return "RE2 has no \\Z; patterns already match the whole path (write \\z for the end of the text)"
    if kind == "invalid repetition size":
        return f"repetition {quote(_short(fragment))}: RE2 allows counts up to {MAX_REPEAT} (nested ones multiplied)"
    return f"{kind}: {quote(_short(fragment))}" if fragment else kind


def _check_braces(text: str) -> None:
    """Refuse a `{...}` that Python's `re` reads as a repetition and RE2 as literal text, or whose count RE2
    refuses. One pass, linear in the pattern's length (a policy file may hold a 1 MiB pattern)."""
    index, in_class, size = 0, False, len(text)
    posix_ends = True  # whether a `:]` may still follow (once a search finds none, none is searched again)
    while index < size:
        char = text[index]
        if char == "\\":
            follows = text[index + 1:index + 2]
            if follows == "Q":  # RE2's literal text, up to \E
                end = text.find("\\E", index + 2)
                index = size if end < 0 else end + 2
            elif follows in ("x", "p", "P") and text.startswith("{", index + 2):  # \x{41}, \p{Greek}
                end = text.find("}", index + 3)
                index = size if end < 0 else end + 1
            else:
                index += 2
        elif in_class:
            if char == "]":
                in_class = False
            elif posix_ends and text.startswith("[:", index):  # [[:alpha:]]: a POSIX class inside a class
                end = text.find(":]", index + 2)
                if end >= 0:
                    index = end + 2
                    continue
                posix_ends = False
            index += 1
        elif char == "[":
            in_class = True
            index += 1
            if text.startswith("^", index):
                index += 1
            if text.startswith("]", index):  # a `]` first in a class is a literal
                index += 1
        elif char == "{":
            index = _check_repeat(text, index)
        else:
            index += 1


def _check_repeat(text: str, start: int) -> int:
    """Check the `{` at `start`; return where scanning goes on (past the digits and comma looked at)."""
    index, size = start + 1, len(text)
    low_end = index
    while low_end < size and "0" <= text[low_end] <= "9":
        low_end += 1
    comma = low_end < size and text[low_end] == ","
    high_end = low_end + 1 if comma else low_end
    high_start = high_end
    while high_end < size and "0" <= text[high_end] <= "9":
        high_end += 1
    low, high = text[index:low_end], text[high_start:high_end]
    if high_end >= size or text[high_end] != "}" or not (low or comma):
        return high_end  # not a repetition for Python either (`{}`, `{x}`, `{1, 2}`): literal in both
    written = text[start:high_end + 1]
    if not low:
        raise PatternError(f"repetition {quote(_short(written))} has no lower count, so RE2 would read it as literal "
                           f"text: write {{0,{_short(high)}}}, or \\{{ for a literal brace")
    if _over(low) or (high and _over(high)):
        raise PatternError(f"repetition {quote(_short(written))}: RE2 allows counts up to {MAX_REPEAT}")
    if any(len(count) > 1 and count[0] == "0" for count in (low, high)):
        raise PatternError(f"repetition {quote(_short(written))} has a count with a leading zero, which RE2 reads as "
                           "literal text: write the count without it")
    return high_end + 1


def _over(digits: str) -> bool:
    significant = digits.lstrip("0")  # int() of thousands of leading zeros would raise (its digit limit)
    return len(significant) > len(str(MAX_REPEAT)) or int(significant or "0") > MAX_REPEAT


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _require_re2() -> None:
    """Refuse a `re2` module that would match with Python's `re` when RE2 cannot (some wrappers do)."""
    try:
        re2.compile(r"(a)\1", _options())
    except re2.error:
        return
    raise ImportError("the `re2` module in use falls back to Python's re for patterns RE2 refuses; aegisd needs "
                      "google-re2 (pip install google-re2)")


_require_re2()
