"""Read one policy file and report every error in it at once, each with line and field path.

The file is composed (not constructed) with PyYAML's safe loader: the node tree keeps each
value's position and its text as written, so `18:00` stays a time (YAML 1.1 would read a
sexagesimal integer) and `mode: off` stays a word (not `false`). Nothing is ever instantiated
from a tag; only the standard YAML tags are accepted.

An alias is walked again wherever it is used, so a few KiB of aliases could stand for millions of rules
and path patterns: the walk counts them (and every list item and mapping entry, and the patterns'
characters) aliases included, and stops with an issue at MAX_RULES, MAX_PATH_PATTERNS, MAX_ENTRIES or
MAX_PATTERN_CHARS. Each pattern is compiled once per file, and each rule's list of distinct patterns
once (a rule's repeated pattern counts once), so aliased copies cost no compiling and no memory.
Whatever else goes wrong while reading a file (an exception no check expected) makes that file invalid, never escapes.

Timezones are read afresh from the timezone database at each load (once per zone and file), never from zoneinfo's
cache: an updated tzdata applies at the next reload, as a changed policy file does. UTC needs no database.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Callable, Hashable, Iterator
from datetime import UTC, tzinfo
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from aegisd.errors import InvalidArgument
from aegisd.policy.model import METHODS, MODES, Issue, PolicyFile, Rule, TimeWindow
from aegisd.policy.pattern import PathPattern, PathSet, PatternError, compile_path, quote
from aegisd.rates import Rate, RateError, parse_rate
from aegisd.vault.credentials import validate_name, validate_service

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_POLICY_BYTES = 1024 * 1024
# Per file, aliased nodes counted each time they are used: far above any real policy, far below what makes a
# reload slow (each path pattern is an RE2 compile).
MAX_RULES = 1_000
MAX_PATH_PATTERNS = 10_000
MAX_ENTRIES = 100_000  # list items and mapping entries walked, all fields together
MAX_PATTERN_CHARS = MAX_POLICY_BYTES  # no more than the file could hold written out without aliases
TOP_FIELDS = ("agent", "mode", "rules")
RULE_FIELDS = ("service", "methods", "paths", "rate_limit", "time_window")
WINDOW_FIELDS = ("start", "end", "timezone")
_STANDARD_TAG = "tag:yaml.org,2002:"
_NULL_TAG = _STANDARD_TAG + "null"
# Plain data only: the tags YAML gives untagged scalars, lists and mappings (never python/*, set, omap...).
_ALLOWED_TAGS = frozenset(_STANDARD_TAG + t for t in ("str", "int", "float", "bool", "null", "timestamp", "seq",
                                                       "map"))
_TIME = re.compile(r"^(\d{1,2}):(\d{2})\Z")
_ZONE_KEY = re.compile(r"^[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*\Z")
_QUOTED = 200  # characters of an invalid pattern quoted in its issue
_ZONE_HINT = "use an IANA name such as Europe/Berlin, America/New_York or UTC, or leave timezone out for UTC"
_KIND = {MappingNode: "a mapping", SequenceNode: "a list", ScalarNode: "a single value"}


def parse_policy(name: str, data: bytes) -> PolicyFile:
    """Parse and validate `data` (the content of file `name`); the result lists every issue found."""
    reader = _Reader(PolicyFile(name))
    try:
        reader.read(data)
    except _TooLarge as exc:
        reader.issue(exc.node, exc.field, exc.message)
    except Exception as exc:  # a bug or a limit no check foresaw: this file is invalid, the others still load
        reader.issue(None, "", unexpected(exc))
    reader.result.issues.sort(key=lambda issue: (issue.line, issue.column))
    return reader.result


def unexpected(exc: BaseException) -> str:
    """The issue for a file whose reading raised `exc`: its type only, never its text (which may quote the
    file)."""
    return f"aegisd could not parse this file: {type(exc).__name__}; the file is treated as invalid"


class _TooLarge(Exception):
    """Over a per-file cap: the walk stops here."""

    def __init__(self, node: Node, field: str, message: str) -> None:
        super().__init__(message)
        self.node, self.field, self.message = node, field, message


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    def __init__(self, result: PolicyFile) -> None:
        self.result = result
        self.rules = self.patterns = self.entries = self.pattern_chars = 0
        # Compiled once per file, however often an alias repeats them: each pattern, and each rule's set of its
        # distinct patterns (or why it is invalid).
        self.compiled: dict[str, PathPattern | str] = {}
        self.sets: dict[tuple[str, ...], PathSet | str] = {}
        self.zones: dict[str, tzinfo | str] = {}  # each zone named, or why it cannot be used

    def count(self, node: Node, path: str, what: str) -> None:
        """Count one rule, path pattern or entry walked (an alias each time it is used); stop over a cap."""
        if what == "rules":
            self.rules += 1
            over = self.rules > MAX_RULES and f"more than {MAX_RULES} rules"
        elif what == "patterns":
            self.patterns += 1
            self.pattern_chars += len(node.value) if isinstance(node, ScalarNode) else 0
            over = (self.patterns > MAX_PATH_PATTERNS and f"more than {MAX_PATH_PATTERNS} path patterns") or (
                self.pattern_chars > MAX_PATTERN_CHARS and f"more than {MAX_PATTERN_CHARS} characters of path patterns")
        else:
            self.entries += 1
            over = self.entries > MAX_ENTRIES and f"more than {MAX_ENTRIES} list items and mapping entries"
        if over:
            raise _TooLarge(node, path, f"the file has {over} (aliases counted each time they are used); "
                            "aegisd stopped reading it here")

    def issue(self, where: Node | tuple[int, int] | None, field: str, message: str) -> None:
        if isinstance(where, Node):
            line, column = where.start_mark.line + 1, where.start_mark.column + 1
        else:
            line, column = where or (0, 0)
        self.result.issues.append(Issue(self.result.name, line, column, field, message))

    # -- the file ----------------------------------------------------------------------------

    def read(self, data: bytes) -> None:
        if len(data) > MAX_POLICY_BYTES:
            self.issue(None, "", f"the file is larger than {MAX_POLICY_BYTES // 1024} KiB")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.issue((data[: exc.start].count(b"\n") + 1, 0), "", "the file is not UTF-8 text")
            return
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = (mark.line + 1, mark.column + 1) if mark is not None else None
            problem = exc.problem or "malformed YAML"
            context = exc.context or ""
            if context and exc.context_mark is not None and exc.context_mark is not mark:
                context += f" from line {exc.context_mark.line + 1}"
            self.issue(where, "", f"YAML syntax error: {problem}" + (f" ({context})" if context else ""))
            return
        except yaml.reader.ReaderError as exc:
            line = text[: exc.position].count("\n") + 1
            self.issue((line, 0), "", f"YAML syntax error: {exc.reason} (character {exc.character!r})")
            return
        except yaml.YAMLError as exc:
            self.issue(None, "", f"YAML syntax error: {exc}")
            return
        except RecursionError:  # PyYAML composes nested lists and mappings recursively
            self.issue(None, "", "the YAML is nested too deeply to read")
            return
        if root is None:
            self.issue((1, 1), "", "the file is empty; a policy needs `agent` and `rules`")
            return
        self.top(root)

    def top(self, node: Node) -> None:
        fields = self.mapping(node, "", TOP_FIELDS, ("agent", "rules"), "a policy file must be a mapping with "
                              "`agent` and `rules`")
        if fields is None:
            return
        # Every `agent:` value, a duplicate's too: `mapping` reports the duplicate (the file is invalid), and an
        # invalid file fails closed for each agent it names. Keeping only the first would leave the one a YAML
        # reader takes (the last) ungoverned.
        for key_node, value in node.value:
            if _is_field(key_node, "agent"):
                agent = self.scalar(value, "agent")
                if agent is not None and self.check(value, "agent", validate_name, agent, "agent name"):
                    self.result.names(agent)
        if "mode" in fields:
            mode = self.scalar(fields["mode"], "mode")
            if mode is not None:
                if mode.lower() in MODES:
                    self.result.mode = mode.lower()
                else:
                    self.issue(fields["mode"], "mode", f"mode {mode!r} must be one of: {', '.join(MODES)}")
        if "rules" in fields:
            for index, item in self.sequence(fields["rules"], "rules", allow_empty=True):
                self.count(item, f"rules[{index}]", "rules")
                rule = self.rule(item, f"rules[{index}]", index)
                if rule is not None:
                    self.result.rules.append(rule)

    def rule(self, node: Node, path: str, index: int) -> Rule | None:
        before = len(self.result.issues)
        fields = self.mapping(node, path, RULE_FIELDS, ("service",), "a rule must be a mapping with at least "
                              "`service`")
        if fields is None:
            return None
        service = self.scalar(fields["service"], _join(path, "service")) if "service" in fields else None
        if service is not None:
            self.check(fields["service"], _join(path, "service"), validate_service, service)
        methods = self.methods(fields["methods"], _join(path, "methods")) if "methods" in fields else None
        paths = self.paths(fields["paths"], _join(path, "paths")) if "paths" in fields else None
        rate = self.rate(fields["rate_limit"], _join(path, "rate_limit")) if "rate_limit" in fields else None
        window = self.window(fields["time_window"], _join(path, "time_window")) if "time_window" in fields else None
        if len(self.result.issues) > before or service is None:
            return None
        mark = fields["service"].start_mark
        return Rule(file=self.result.name, index=index, line=node.start_mark.line + 1, service=service,
                    methods=methods, paths=paths, rate=rate, window=window,
                    service_at=(mark.line + 1, mark.column + 1))

    # -- rule fields -------------------------------------------------------------------------

    def methods(self, node: Node, path: str) -> frozenset[str] | None:
        found: set[str] = set()
        for index, item in self.sequence(node, path):
            method = self.scalar(item, f"{path}[{index}]")
            if method is None:
                continue
            if method == "*":
                found.add("*")
            elif method.upper() in METHODS:
                found.add(method.upper())
            else:
                self.issue(item, f"{path}[{index}]", f"unknown method {method!r}; use {', '.join(METHODS)} or *")
        return None if "*" in found or not found else frozenset(found)

    def paths(self, node: Node, path: str) -> PathSet | None:
        compiled: list[PathPattern] = []
        for index, item in self.sequence(node, path):
            self.count(item, f"{path}[{index}]", "patterns")
            pattern = self.scalar(item, f"{path}[{index}]")
            if pattern is None:
                continue
            found = _once(self.compiled, pattern, functools.partial(compile_path, pattern))
            if isinstance(found, str):
                quoted = pattern if len(pattern) <= _QUOTED else pattern[:_QUOTED] + "..."
                self.issue(item, f"{path}[{index}]", f"invalid regular expression {quote(quoted)}: {found}")
            else:
                compiled.append(found)
        if not compiled:
            return None
        unique = tuple({pattern.text: pattern for pattern in compiled}.values())  # a repeat matches nothing more
        key = tuple(pattern.text for pattern in unique)
        path_set = _once(self.sets, key, functools.partial(PathSet, unique))
        if isinstance(path_set, str):
            self.issue(node, path, path_set)
            return None
        return path_set

    def rate(self, node: Node, path: str) -> Rate | None:
        text = self.scalar(node, path)
        if text is None:
            return None
        try:
            return parse_rate(text)
        except RateError as exc:
            self.issue(node, path, str(exc))
            return None

    def window(self, node: Node, path: str) -> TimeWindow | None:
        fields = self.mapping(node, path, WINDOW_FIELDS, ("start", "end"), "time_window must be a mapping like "
                              '{start: "09:00", end: "18:00", timezone: Europe/Berlin}')
        if fields is None:
            return None
        start = self.time(fields["start"], _join(path, "start")) if "start" in fields else None
        end = self.time(fields["end"], _join(path, "end")) if "end" in fields else None
        zone: tzinfo = UTC  # needs no timezone database
        zone_name = "UTC"
        if "timezone" in fields:
            zone_node = fields["timezone"]
            zone_name = self.scalar(zone_node, _join(path, "timezone")) or ""
            # An empty value is an issue too: a window that silently fell away would allow every hour.
            found = self.zone(zone_name) if zone_name else f"timezone has no value; {_ZONE_HINT}"
            if isinstance(found, str):
                self.issue(zone_node, _join(path, "timezone"), found)
                return None
            zone = found
        if start is None or end is None:
            return None
        if start == end:
            self.issue(node, path, "start and end are the same time, so the window is empty; omit time_window "
                       "to allow every hour")
            return None
        text = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d} {zone_name}"
        return TimeWindow(start, end, zone, text)

    def zone(self, name: str) -> tzinfo | str:
        """The zone `name`, or the issue saying why there is none: looked up once per file, however many windows
        name it, so the gate's requests only convert the time."""
        found = self.zones.get(name)
        if found is None:
            found = self.zones[name] = _zone(name, lambda: self.database)
        return found

    @functools.cached_property
    def database(self) -> bool:
        """Whether zoneinfo finds any timezone database: asked only for a zone it did not find, once per file (it
        lists every zone)."""
        return bool(zoneinfo.available_timezones())

    def time(self, node: Node, path: str) -> int | None:
        text = self.scalar(node, path)
        if text is None:
            return None
        match = _TIME.match(text.strip())
        if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
            self.issue(node, path, f"time {text!r} must be HH:MM between 00:00 and 23:59")
            return None
        return int(match.group(1)) * 60 + int(match.group(2))

    # -- shapes ------------------------------------------------------------------------------

    def mapping(self, node: Node, path: str, allowed: tuple[str, ...], required: tuple[str, ...],
                wrong_kind: str) -> dict[str, Node] | None:
        """The mapping's values by key; unknown, duplicate and missing fields are reported."""
        if not isinstance(node, MappingNode):
            self.issue(node, path, f"{wrong_kind}, not {_KIND.get(type(node), 'that')}")
            return None
        if not self.standard_tag(node, path):
            return None
        fields: dict[str, Node] = {}
        for key_node, value in node.value:
            self.count(key_node, path, "entries")
            key = key_node.value if _is_field(key_node) else None
            if key is None:
                self.issue(key_node, path, "field names must be plain words")
            elif not self.standard_tag(key_node, _join(path, str(key))):  # `!custom methods:`: no tag, here either
                pass
            elif key not in allowed:
                self.issue(key_node, _join(path, str(key)), f"unknown field {key!r}; expected one of: "
                           f"{', '.join(allowed)}")
            elif key in fields:
                self.issue(key_node, _join(path, key), f"field {key!r} is given twice")
            else:
                fields[key] = value
        for key in required:
            if key not in fields:
                self.issue(node, _join(path, key), f"missing required field {key!r}")
        return fields

    def sequence(self, node: Node, path: str, allow_empty: bool = False) -> Iterator[tuple[int, Node]]:
        if not isinstance(node, SequenceNode):
            self.issue(node, path, f"{path.rsplit('.', 1)[-1]} must be a list, not {_KIND.get(type(node), 'that')}"
                       if not _is_null(node) else f"{path.rsplit('.', 1)[-1]} has no value; give a list")
            return
        if not self.standard_tag(node, path):
            return
        if not node.value and not allow_empty:
            self.issue(node, path, "the list is empty; omit the field to allow any value")
        for index, item in enumerate(node.value):
            self.count(item, f"{path}[{index}]", "entries")
            yield index, item

    def scalar(self, node: Node, path: str) -> str | None:
        if not isinstance(node, ScalarNode):
            self.issue(node, path, f"expected a single value, not {_KIND.get(type(node), 'that')}")
            return None
        if _is_null(node):
            self.issue(node, path, "the field has no value; remove it or give one")
            return None
        if not self.standard_tag(node, path):
            return None
        return str(node.value)

    def standard_tag(self, node: Node, path: str) -> bool:
        if node.tag not in _ALLOWED_TAGS:
            self.issue(node, path, f"unsupported YAML tag {node.tag!r}")
            return False
        return True

    def check(self, node: Node, path: str, validator: Callable[..., str], value: str, *args: str) -> bool:
        try:
            validator(value, *args)
        except InvalidArgument as exc:
            self.issue(node, path, exc.message)
            return False
        return True


def _is_field(node: Node, name: str | None = None) -> bool:
    """Whether a mapping key is a plain field name (`name`, if given)."""
    return isinstance(node, ScalarNode) and node.tag != _NULL_TAG and (name is None or node.value == name)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL_TAG


def _zone(name: str, database: Callable[[], bool]) -> tzinfo | str:
    """The zone `name`, read from the timezone database now (ZoneInfo's cache would keep the rules it read first,
    until a restart), or the issue saying why there is none. `database()`: whether there is one at all."""
    if name == "UTC":
        return UTC  # needs no database
    if not _ZONE_KEY.match(name):
        return f"unknown timezone {name!r}; {_ZONE_HINT}"
    try:
        return ZoneInfo.no_cache(name)
    except ZoneInfoNotFoundError:
        if database():
            return f"unknown timezone {name!r}; {_ZONE_HINT}"
        searched = ", ".join(zoneinfo.TZPATH) or "no directory"
        return (f"timezone {name!r} cannot be looked up: aegisd found no timezone database (searched {searched} "
                "and the tzdata Python package); install the tzdata Python package or the system's tzdata, or leave "
                "timezone out for UTC")
    except (ValueError, OSError) as exc:  # a file in the database that is not a zone, or cannot be read
        why = getattr(exc, "strerror", None) or str(exc)
        return f"timezone {name!r} cannot be read from the timezone database: {why}"


def _once(cache: dict[K, V | str], key: K, build: Callable[[], V]) -> V | str:
    """`build()`, or why it failed (its PatternError's message), made once per key."""
    found = cache.get(key)
    if found is None:
        try:
            found = build()
        except PatternError as exc:
            found = str(exc)
        cache[key] = found
    return found
