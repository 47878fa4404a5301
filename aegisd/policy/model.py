"""What a policy file becomes once read: rules compiled for the gate's hot path, and precise issues.

Path patterns are compiled (with RE2: linear time, see pattern.py) and time windows resolved to a zone
when the file is loaded, so judging a request is a few dict lookups, a method set test, a `fullmatch` and
at most one clock conversion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, tzinfo

from aegisd.policy.pattern import PathSet
from aegisd.rates import Rate

MODES = ("enforce", "dry-run", "off")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Why a rule did not allow a request, in the order the checks run (later = closer to a match).
MISS_METHOD, MISS_PATH, MISS_WINDOW = "method", "path", "time_window"
# The instants a time window can be judged at (epoch ms, both ends included): 0001-01-02T00:00:00Z to
# 9999-12-30T23:59:59.999Z. A day inside datetime's years 1-9999, so the local time in any zone (offsets stay
# well under a day) is a date Python can hold; `policy test --at` refuses anything outside.
JUDGED_FROM_MS = -62135510400000
JUDGED_UNTIL_MS = 253402214399999


@dataclass(frozen=True, slots=True)
class Issue:
    """One validation error: where it is (file, 1-based line and column, field path) and what is wrong."""

    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Daily [start, end) in a zone's local time; start > end spans midnight."""

    start: int  # minutes after local midnight
    end: int
    zone: tzinfo  # a ZoneInfo, or datetime.UTC (which needs no timezone database)
    text: str  # "09:00-18:00 Europe/Berlin", for messages

    def contains(self, now_ms: int) -> bool:
        local = datetime.fromtimestamp(now_ms / 1000, self.zone)
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of a file's `rules`, ready to judge requests."""

    file: str
    index: int
    line: int
    service: str
    methods: frozenset[str] | None  # None: any method
    paths: PathSet | None  # None: any path
    rate: Rate | None
    window: TimeWindow | None
    # Line and column of the `service:` value, for warnings about it (hints.py); not part of the rule's identity.
    service_at: tuple[int, int] = field(default=(0, 0), compare=False)

    @property
    def ref(self) -> str:
        """A stable name for messages, ledger flags and the rule's rate-limit state."""
        return f"{self.file}#rules[{self.index}]"

    def miss(self, method: str, path: bytes, now_ms: int) -> str | None:
        """None if this rule allows the request, else which check failed first. `path` as pattern.encode_path
        gives it, encoded once per request rather than once per rule."""
        if self.methods is not None and method not in self.methods:
            return MISS_METHOD
        if self.paths is not None and not self.paths.matches(path):
            return MISS_PATH
        if self.window is not None and not self.window.contains(now_ms):
            return MISS_WINDOW
        return None


@dataclass(slots=True)
class PolicyFile:
    """One file as read: the agents it names, its rules if it parsed, and every issue found in it.

    A valid file names exactly one agent. An invalid one may name several (a duplicated `agent:` key, more
    `agent:` lines in broken text, the agent of its last valid version): it was meant to restrict one of
    them and aegisd cannot know which, so every one of them fails closed.
    """

    name: str
    agents: list[str] = field(default_factory=list)
    mode: str = "enforce"
    rules: list[Rule] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.issues

    @property
    def agent(self) -> str:
        """The agents it names as one line for people ("bot-a, bot-b"); empty when it names none."""
        return ", ".join(self.agents)

    def names(self, *agents: str | None) -> None:
        """Add agents this file names, each once, in the order found."""
        for agent in agents:
            if agent is not None and agent not in self.agents:
                self.agents.append(agent)
