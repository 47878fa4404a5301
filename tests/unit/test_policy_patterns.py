"""Policy path patterns and the limits of reading a policy file: paths are matched with RE2 (linear time, no
fallback to Python's backtracking `re`), a pattern or file that cannot be read makes only its file invalid,
and aliases cannot multiply a small file into millions of rules or patterns."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
import re2

from aegisd.policy import PolicyStore, compile_set, parse_policy
from aegisd.policy.model import PolicyFile
from aegisd.policy.parse import MAX_ENTRIES, MAX_PATH_PATTERNS, MAX_PATTERN_CHARS, MAX_RULES
from aegisd.policy.pattern import (
    JUDGING_BUDGET,
    MAX_JUDGED_PATH,
    MAX_PATTERN_LENGTH,
    MAX_PROGRAM_SIZE,
    PathPattern,
    compile_path,
)


def _policy(*patterns: str) -> bytes:
    quoted = ", ".join("'" + p.replace("'", "''") + "'" for p in patterns)
    return f"agent: bot\nrules:\n  - service: svc\n    paths: [{quoted}]\n".encode()


def _issues(*patterns: str) -> list[str]:
    return [issue.message for issue in parse_policy("bot.yaml", _policy(*patterns)).issues]


def _allows(pattern: str, path: str) -> bool:
    parsed = parse_policy("bot.yaml", _policy(pattern))
    assert parsed.valid, parsed.issues
    verdict = compile_set([parsed]).judge("bot", "svc", "GET", path, 0)
    assert verdict is not None
    return verdict.allowed


def test_path_patterns_are_compiled_with_re2() -> None:
    """The matcher the gate, `policy test` and `policy validate` use (all go through parse_policy) is an RE2
    object: its time is linear in the path, so a long path cannot stall the gate's event loop."""
    parsed = parse_policy("bot.yaml", _policy("/repos/.*/.*/issues", "/user"))
    assert parsed.valid, parsed.issues
    paths = parsed.rules[0].paths
    assert paths is not None and len(paths) == 2
    for pattern in paths:
        assert isinstance(pattern, PathPattern)
        assert isinstance(pattern.regexp, re2._Regexp)
        assert isinstance(pattern.regexp._regexp, re2._re2.RE2)  # the C++ engine, not a wrapper around `re`
        assert pattern.regexp.options.never_capture
    # The attack from the review: quadratic for `re`, one linear pass for RE2 (only the verdict is checked).
    assert not _allows("/repos/acme/.*/issues/.*", "/repos/acme/" + "issues/" * 8500 + "\n")
    assert not _allows("/repos/.*/.*/issues", "/repos/" + "a/" * 30000 + "x")


def test_a_rules_patterns_are_matched_as_one_set_exactly_as_each_would_match() -> None:
    """The gate matches a rule's patterns with one RE2 set (one pass, no per-pattern match objects); it must
    allow exactly the paths some pattern alone fully matches."""
    patterns = ("/repos/acme/.*", "/user", "/repos/acme/[^/]+/issues", "/v1/(models|chat)/?", "/caf\u00e9/\\d+")
    parsed = parse_policy("bot.yaml", _policy(*patterns))
    assert parsed.valid, parsed.issues
    rule_paths = parsed.rules[0].paths
    assert rule_paths is not None and [p.text for p in rule_paths] == list(patterns)
    policies = compile_set([parsed])
    for path in ("/user", "/user/", "/users", "/repos/acme/x/issues", "/repos/other/x", "/v1/models", "/v1/chat/",
                 "/v1/embeddings", "/caf\u00e9/12", "/caf\u00e9/\u0661", "/repos/acme/\n", "", "/"):
        alone = any(p.fullmatch(path.encode("utf-8", "surrogatepass")) for p in rule_paths)
        verdict = policies.judge("bot", "svc", "GET", path, 0)
        assert verdict is not None and verdict.allowed is alone, path


def test_a_rule_whose_patterns_re2_cannot_compile_together_is_refused() -> None:
    """Each pattern is at most MAX_PROGRAM_SIZE, so only a rule of several near it is too much for one RE2 set:
    refused (fails closed) with what to do, not matched a pass per pattern (which a 20-pattern rule once was)."""
    pattern = "/a/[^/]{1,450}/x%d"
    assert 3500 < compile_path(pattern % 0).size <= MAX_PROGRAM_SIZE
    (issue,) = _issues(*(pattern % i for i in range(60)))
    assert issue == "the rule's 60 patterns are more than RE2 can compile together; shorten them, or split them over " \
        "several rules"
    assert not _issues(*(pattern % i for i in range(20)))


def test_a_repetition_count_with_leading_zeros_is_refused_not_crashed_on() -> None:
    """Python's re reads `a{02}` as two `a`s, RE2 as the text `a{02}`: refused, like the other braces the two
    read differently. Thousands of zeros (int() refuses over 4,300 digits) get the same answer, not a crash."""
    zeros = "0" * 5000
    (issue,) = _issues(f"a{{{zeros}1001}}")
    assert "RE2 allows counts up to 1000" in issue
    for pattern in ("/a{02}", "/a{1,02}", "/a{00}", f"/a{{{zeros}2}}", f"/a{{1,{zeros}2}}"):
        (issue,) = _issues(pattern)
        assert "leading zero" in issue, pattern
    assert _allows("/a{0}", "/") and _allows("/a{0,2}", "/aa") and _allows("/a{10}", "/" + "a" * 10)


@pytest.mark.parametrize(("pattern", "what"), [
    (r"/repos/([^/]+)/\1", r"backreference '\1'"),
    (r"/repos/(?P<o>[^/]+)/(?P=o)", "backreference `(?P=name)`"),
    ("/repos/(?=acme)[^/]+", "lookahead `(?=...)`"),
    ("/repos/(?!evil)[^/]+", "negative lookahead"),
    ("/repos/(?<=s/)acme", "lookbehind"),
    ("/repos/(?<!x)acme", "negative lookbehind"),
    ("/repos/(?>a+)", "atomic group"),
    ("/repos/a++", "possessive quantifier"),
    ("/repos/(a)?(?(1)b|c)", "conditional"),
])
def test_a_construct_re2_cannot_match_in_linear_time_makes_the_file_invalid(pattern: str, what: str) -> None:
    """No silent fallback to Python's `re`: the file is invalid (and so fails closed)."""
    issues = _issues("/ok", pattern)
    assert len(issues) == 1, issues
    assert issues[0].startswith(f"invalid regular expression '{pattern}': "), issues
    assert what in issues[0], issues
    assert "RE2 cannot match in linear time" in issues[0] and "aegisd matches paths with RE2" in issues[0]
    assert "(see docs/policies.md#path-patterns)" in issues[0], issues  # the section that exists


def test_an_invalid_pattern_is_quoted_as_written_not_as_a_python_repr() -> None:
    """A pattern written `/a\\Z` is quoted with one backslash (repr doubled it, so the message showed a pattern
    the user never wrote); only control characters, which must not reach a terminal or a log line, are escapes."""
    assert _issues(r"/a\Z") == [r"invalid regular expression '/a\Z': RE2 has no \Z; patterns already match the "
                                r"whole path (write \z for the end of the text)"]
    (issue,) = _issues(r"(a)\1")
    assert issue.startswith(r"invalid regular expression '(a)\1': it uses a backreference '\1', "), issue
    escapes = b'agent: bot\nrules:\n  - service: s\n    paths: ["/a\\e]0;x\\a["]\n'  # YAML's escapes for ESC, BEL
    (issue,) = [i.message for i in parse_policy("bot.yaml", escapes).issues]
    assert issue.startswith(r"invalid regular expression '/a\x1b]0;x\x07[': "), issue
    assert "\x1b" not in issue and "\x07" not in issue


@pytest.mark.parametrize(("pattern", "what"), [
    ("/only/a{4294967296}", "repetition '{4294967296}': RE2 allows counts up to 1000"),  # OverflowError in `re`
    ("/x{1,99999999999999999999}", "RE2 allows counts up to 1000"),
    ("/x{1001}", "RE2 allows counts up to 1000"),
    ("/x{" + "1" * 5000 + "}", "RE2 allows counts up to 1000"),  # more digits than int() takes
    ("/x{,3}", "write {0,3}"),  # Python reads a repetition, RE2 literal text: refused, never reinterpreted
    ("/x{,}", "write {0,}"),
    (r"/x\Z", "RE2 has no \\Z"),
    ("/repos/(acme", "missing ): '/repos/(acme'"),
    ("[z-a]", "invalid character class range"),
    ("/x" * MAX_PATTERN_LENGTH, f"aegisd takes at most {MAX_PATTERN_LENGTH}"),
])
def test_a_pattern_whose_compile_failed_oddly_is_an_issue_on_that_pattern(pattern: str, what: str) -> None:
    """`re` raised OverflowError or RecursionError for some of these, out of parse_policy."""
    issues = _issues(pattern)
    assert len(issues) == 1 and what in issues[0], issues
    assert len(issues[0]) < 600  # a long pattern is quoted in part


def test_a_pattern_that_is_not_unicode_text_is_an_issue() -> None:
    parsed = parse_policy("bot.yaml", b'agent: bot\nrules:\n  - service: s\n    paths: ["/\\ud800"]\n')
    assert [i.message for i in parsed.issues] == [
        "invalid regular expression '/\\ud800': it cannot be compiled (UnicodeEncodeError)"]


def test_full_match_semantics_of_ordinary_patterns() -> None:
    assert _allows("/user", "/user") and not _allows("/user", "/x/user") and not _allows("/user", "/user/keys")
    assert _allows("/user(/.*)?", "/user/keys") and _allows("/user(/.*)?", "/user")
    assert not _allows("/a/.*", "/a/x\ny") and _allows("(?s)/a/.*", "/a/x\ny")  # `.` stops at a newline
    assert not _allows("/a$", "/a\n") and not _allows("/a", "/a\n")
    assert _allows("/repos/[^/]+/issues", "/repos/é/issues") and not _allows("/repos/[^/]+/issues", "/repos/a/b/issues")
    assert _allows("(?i)/USER", "/user") and _allows("/x{2}", "/xx") and _allows("/x{0,2}", "/")
    assert _allows(r"/x/\{,3\}", "/x/{,3}") and _allows("/x[{,3}]", "/x,") and _allows(r"/\x{41}", "/A")
    assert _allows("/(((((((((((x)))))))))))", "/x") and _allows("(" * 2000 + "/x" + ")" * 2000, "/x")
    assert _allows(r"/n/\pN+", "/n/١٢") and _allows("/[[:alpha:]]+", "/abc")
    # RE2's \d, \w, \s and \b are ASCII-only (Python's are Unicode): documented in docs/policies.md.
    assert _allows(r"/issues/\d+", "/issues/42") and not _allows(r"/issues/\d+", "/issues/١٢")
    assert not _allows(r"/\w+", "/é") and _allows(r"/\W", "/é")
    # A path that is not valid UTF-8 text (a lone surrogate) is judged, not an exception.
    assert _allows("/a/.*", "/a/\ud800") is not None


def test_an_unexpected_exception_while_reading_makes_only_that_file_invalid(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    # Nested deeper than PyYAML's recursive composer goes: RecursionError escaped parse_policy before.
    nested = parse_policy("bot.yaml", b"agent: bot\nrules:\n  - service: s\n    paths: " + b"[" * 5000 + b"]" * 5000)
    assert [i.message for i in nested.issues] == ["the YAML is nested too deeply to read"]

    def boom(*args: object) -> str:
        raise ZeroDivisionError("secret-looking text from the file")

    monkeypatch.setattr("aegisd.policy.pattern._check_braces", boom)
    parsed = parse_policy("bot.yaml", _policy("/x"))
    assert parsed.agents == ["bot"]
    assert [str(i) for i in parsed.issues] == [
        "bot.yaml: aegisd could not parse this file: ZeroDivisionError; the file is treated as invalid"]
    monkeypatch.undo()

    # And should anything still escape parse_policy, the reload goes on: that file fails closed for its agent,
    # the others' changes apply.
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "alice.yaml").write_text("agent: alice\nrules:\n  - service: svc\n")
    (policies / "bob.yaml").write_text("agent: bob\nrules:\n  - service: svc\n")
    store = PolicyStore(policies)
    asyncio.run(store.reload("startup"))
    def failing(name: str, data: bytes) -> PolicyFile:
        if name == "bob.yaml":
            raise OverflowError("secret-looking text from the file")
        return parse_policy(name, data)

    monkeypatch.setattr("aegisd.policy.store.parse_policy", failing)
    (policies / "alice.yaml").write_text("agent: alice\nrules: []\n")
    snapshot = asyncio.run(store.reload("aegisctl"))
    files = {f.name: f for f in snapshot.files}
    assert files["alice.yaml"].valid and not files["bob.yaml"].valid
    assert [str(i) for i in files["bob.yaml"].issues] == [
        "bob.yaml: aegisd could not parse this file: OverflowError; the file is treated as invalid"]
    assert files["bob.yaml"].agents == ["bob"]  # from its text
    bob = store.current.judge("bob", "svc", "GET", "/x", 0)
    alice = store.current.judge("alice", "svc", "GET", "/x", 0)
    assert bob is not None and not bob.allowed and bob.miss == "invalid"
    assert alice is not None and not alice.allowed and alice.miss == "no_rule"  # the change applied


def _aliased(count: int, patterns: int = 1, methods: int = 1) -> bytes:
    paths = ", ".join(f'"/p{i}"' for i in range(patterns))
    verbs = ", ".join(["GET"] * methods)
    return (f"agent: bot\nrules:\n  - &r {{service: s, methods: [{verbs}], paths: [{paths}]}}\n"
            + "  - *r\n" * (count - 1)).encode()


@pytest.mark.parametrize(("data", "what", "where"), [
    (_aliased(MAX_RULES + 1), f"more than {MAX_RULES} rules", f"rules[{MAX_RULES}]"),
    (_aliased(MAX_PATH_PATTERNS // 500 + 1, patterns=500), f"more than {MAX_PATH_PATTERNS} path patterns",
     f"rules[{MAX_PATH_PATTERNS // 500}].paths[0]"),
    (_aliased(MAX_RULES, methods=MAX_ENTRIES // MAX_RULES), f"more than {MAX_ENTRIES} list items", "rules["),
])
def test_aliases_count_towards_the_per_file_caps(data: bytes, what: str, where: str) -> None:
    """An alias is walked again each time it is used: a 17 KiB file stood for 4,000 rules of 800 patterns."""
    assert len(data) < 64 * 1024
    parsed = parse_policy("bot.yaml", data)
    assert not parsed.valid and parsed.agents == ["bot"]
    assert len(parsed.issues) == 1, parsed.issues[:3]
    issue = parsed.issues[0]
    assert what in issue.message and "aliases counted each time they are used" in issue.message
    assert issue.field.startswith(where) and issue.line == 3  # an alias is the node it names: the anchor's line


def test_a_file_at_the_caps_is_valid() -> None:
    parsed = parse_policy("bot.yaml", _aliased(MAX_RULES, patterns=MAX_PATH_PATTERNS // MAX_RULES))
    assert parsed.valid, parsed.issues[:3]
    assert len(parsed.rules) == MAX_RULES


def test_compile_path_refuses_what_re2_would_read_differently_from_re() -> None:
    for ok in ("/a{}", "/a{x}", "/a{1, 2}", r"/\p{Greek}", r"\Q{,3}\E", "[]{,3}]", "[^]{,3}]"):
        assert compile_path(ok).text == ok


def test_a_re2_module_that_falls_back_to_re_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Some `re2` wrappers quietly match with Python's `re` what RE2 refuses; aegisd must not run on one."""
    import re

    from aegisd.policy import pattern

    monkeypatch.setattr(re2, "compile", lambda text, options=None: re.compile(text))
    with pytest.raises(ImportError, match="falls back to Python's re"):
        pattern._require_re2()
    monkeypatch.undo()
    pattern._require_re2()  # the real one: google-re2, no fallback


def test_a_pattern_whose_program_could_stall_the_gate_is_refused() -> None:
    """Found by a cold review: `/.*a.{1000}x` was valid, and a crafted 64 KiB path held the gate's event loop for
    seconds (RE2 builds a DFA state at each byte, each costing up to the program's size). A program over
    MAX_PROGRAM_SIZE is refused, saying why and what to write; ordinary patterns and Unicode classes stay valid."""
    for pattern in ("/.*a.{1000}.{1000}.{1000}x", r"/files/\pL{1,64}"):
        (issue,) = _issues(pattern)
        assert f"RE2 instructions and aegisd takes at most {MAX_PROGRAM_SIZE}, since matching" in issue, issue
        assert "write + or * instead (such as [^/]+)" in issue
    # From a review of that fix: its first limit refused ordinary patterns such as the third (4,598 instructions).
    assert not _issues(r"/files/\pL+/\pL+", "/v1/[^/]{1,255}/x", "(?i)/users/[a-z0-9-]{1,39}/repos",
                       "/a/[^/]{1,255}/b/[^/]{1,255}")


def test_a_path_is_judged_only_as_long_as_its_patterns_match_it_quickly() -> None:
    """The review's other half: judging costs up to the path's bytes times the program sizes of the patterns it
    meets, kept within JUDGING_BUDGET (tens of ms, however the path is crafted); a longer path is not judged but
    denied as `path_too_long`, and no path over MAX_JUDGED_PATH bytes is judged whatever the patterns."""
    parsed = parse_policy("bot.yaml", _policy("/repos/acme/.*", "/.*a.{200}x"))
    assert parsed.valid, parsed.issues
    policies = compile_set([parsed])
    paths = parsed.rules[0].paths
    assert paths is not None and policies.agents["bot"].longest == {"svc": JUDGING_BUDGET // paths.size}
    longest = JUDGING_BUDGET // paths.size
    assert 1000 < longest < MAX_JUDGED_PATH
    crafted = "/" + "".join(random.Random(1).choice("a/") for _ in range(longest - 1))  # a new DFA state a byte
    verdict = policies.judge("bot", "svc", "GET", crafted, 0)  # judged (up to ~25 ms here; 64 KiB took 0.75 s)
    assert verdict is not None and verdict.miss == "path"
    over = policies.judge("bot", "svc", "GET", "/repos/acme/" + "\u00e9" * (longest // 2), 0)  # UTF-8 bytes
    assert over is not None and not over.allowed and over.miss == "path_too_long" and over.flag == "path_too_long"
    assert f"the policy for agent 'bot' judges paths of at most {longest} bytes for service 'svc'" in over.detail

    cheap = compile_set([parse_policy("bot.yaml", _policy("/repos/acme/.*"))])
    at_most = "/repos/acme/" + "x" * (MAX_JUDGED_PATH - len("/repos/acme/"))
    allowed = cheap.judge("bot", "svc", "GET", at_most, 0)
    assert allowed is not None and allowed.allowed
    refused = cheap.judge("bot", "svc", "GET", at_most + "x", 0)
    assert refused is not None and refused.miss == "path_too_long"

    # Rules without `paths` match no pattern against the path, so no length is refused (found by a review: 8 KiB was).
    no_paths = compile_set([parse_policy("bot.yaml", b"agent: bot\nrules:\n  - service: svc\n")])
    long_path = no_paths.judge("bot", "svc", "GET", "/x" * MAX_JUDGED_PATH, 0)
    assert long_path is not None and long_path.allowed


@pytest.mark.parametrize(("pattern", "says"), [
    ("(?x)/a b", "RE2 has no verbose flag (?x): remove it, and the spaces and comments it allowed"),
    ("(?ix)/a", "RE2 has no verbose flag (?x)"),
    ("(?a)/a", r"RE2 has no (?a) flag: remove it; \d, \w, \s and \b are already ASCII-only in RE2"),
    ("(?u)/a", r"RE2 has no (?u) flag: remove it and write a Unicode class where you mean one (\p{Nd}"),
    ("(?L)/a", "RE2 has no locale flag (?L): remove it"),
    ("/a(?#why)", "RE2 has no comments (?#...): remove the comment"),
])
def test_python_only_flags_and_comments_say_what_to_write_instead(pattern: str, says: str) -> None:
    """Found by a review: these said only `invalid perl operator: '(?x'`, where the docs promise what to write."""
    (issue,) = _issues(pattern)
    assert issue.startswith(f"invalid regular expression '{pattern}': {says}"), issue


def _aliased_alternation(copies: int, rules: int) -> bytes:
    """The review's file: one ~4,000-character alternation used `copies` times in a rule, that rule `rules` times."""
    words = [f"repo{i:04d}{'xyz'[i % 3]}" for i in range(400)]
    pattern = "/(" + "|".join(words) + ")"
    return (f"agent: bot\nrules:\n  - &r\n    service: svc\n    paths: [&p '{pattern}'{', *p' * (copies - 1)}]\n"
            + "  - *r\n" * (rules - 1)).encode()


def test_aliased_patterns_are_compiled_once_and_counted_each_time() -> None:
    """Found by a cold review: each alias copy was still added to an RE2 set, compiled per rule (a 9 KB file took
    6.4 s and 166 MB to reload). A rule's repeated pattern counts once, one set serves every rule with the same
    patterns, and the patterns' characters are capped per file, aliases counted each time they are used."""
    parsed = parse_policy("bot.yaml", _aliased_alternation(10, 20))
    assert parsed.valid, parsed.issues
    sets = {id(rule.paths) for rule in parsed.rules}
    assert len(parsed.rules) == 20 and len(sets) == 1
    paths = parsed.rules[0].paths
    assert paths is not None and len(paths) == 1

    data = _aliased_alternation(10, 100)
    assert len(data) < 8 * 1024
    started = time.perf_counter()
    parsed = parse_policy("bot.yaml", data)
    assert time.perf_counter() - started < 1
    (issue,) = parsed.issues
    assert f"more than {MAX_PATTERN_CHARS} characters of path patterns" in issue.message
    assert "aliases counted each time they are used" in issue.message
