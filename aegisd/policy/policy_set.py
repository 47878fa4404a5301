"""A loaded set of policy files, indexed by agent and service, and the judgement of one request.

Semantics (docs/policies.md): an agent no file names is governed by its grants and scopes only.
An agent a file names may make a request only if one of its rules for that service allows the
method, the whole decoded path and the current time; the first such rule (files in name order,
rules in file order) is the rule that decided, and its rate limit applies. An agent named by an
invalid file fails closed (every agent the file names), and if some invalid file's agent cannot be told,
every agent does. A path longer than the agent's patterns for the service can be matched against within
pattern.JUDGING_BUDGET is not judged: it is denied as path_too_long (the gate's 414).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from aegisd.policy.model import MISS_METHOD, MISS_PATH, MISS_WINDOW, Issue, PolicyFile, Rule
from aegisd.policy.pattern import encode_path, judged_length

NO_RULE, INVALID, TOO_LONG = "no_rule", "invalid", "path_too_long"
_CLOSENESS = {MISS_METHOD: 0, MISS_PATH: 1, MISS_WINDOW: 2}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The policy's answer for one request to a governed agent."""

    allowed: bool
    mode: str  # "enforce" or "dry-run"
    rule: Rule | None  # the rule that allowed it, or on a denial the rule that came closest
    miss: str = ""  # on a denial: no_rule, method, path, time_window, invalid or path_too_long
    detail: str = ""
    also: Rule | None = None  # allowed: another rule that had to allow it too (the path without `;` parameters)

    @property
    def allowing(self) -> tuple[Rule, ...]:
        """The rules whose rate limits and time windows an allowed request is held to."""
        if not self.allowed or self.rule is None:
            return ()
        return (self.rule,) if self.also is None or self.also is self.rule else (self.rule, self.also)

    @property
    def flag(self) -> str:
        """`check@file#rules[i]` for the ledger's flags column; commas never appear in it."""
        where = self.rule.ref if self.rule is not None else ""
        return (f"{self.miss}@{where}" if where else self.miss).replace(",", "_")


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    agent: str
    mode: str
    rules: dict[str, tuple[Rule, ...]]  # by service, in evaluation order
    files: tuple[str, ...]
    invalid: tuple[str, ...] = ()  # invalid files naming this agent: it fails closed while any exist
    # by service: the longest path (bytes) its rules judge; longer is refused unjudged (pattern.JUDGING_BUDGET)
    longest: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicySet:
    agents: dict[str, AgentPolicy] = field(default_factory=dict)
    fail_all: tuple[str, ...] = ()  # invalid files whose agent is unknown: every agent fails closed

    def judge(self, agent: str, service: str, method: str, path: str, now_ms: int) -> Verdict | None:
        """None when no policy governs `agent`; else whether the request is allowed and why."""
        if self.fail_all:
            return _invalid(self.fail_all, "a policy file whose agent cannot be determined")
        policy = self.agents.get(agent)
        if policy is None:
            return None
        if policy.invalid:
            return _invalid(policy.invalid, f"the policy for agent {agent!r}")
        rules = policy.rules.get(service)
        if not rules:
            return Verdict(False, policy.mode, None, NO_RULE, f"the policy for agent {agent!r} has no rule for "
                           f"service {service!r}")
        encoded = encode_path(path)
        if len(encoded) > policy.longest[service]:  # matching it could hold the gate's event loop for seconds
            return Verdict(False, policy.mode, None, TOO_LONG, f"the path is {len(encoded)} bytes long; the policy "
                           f"for agent {agent!r} judges paths of at most {policy.longest[service]} bytes for service "
                           f"{service!r} (the more complex its path patterns, the shorter: see "
                           "docs/policies.md#path-patterns)")
        closest: tuple[int, Rule, str] | None = None
        for rule in rules:
            miss = rule.miss(method, encoded, now_ms)
            if miss is None:
                return Verdict(True, policy.mode, rule)
            if closest is None or _CLOSENESS[miss] > closest[0]:
                closest = (_CLOSENESS[miss], rule, miss)
        assert closest is not None
        _, rule, miss = closest
        why = {MISS_METHOD: f"method {method} is not allowed", MISS_PATH: "the path matches none of its patterns",
               MISS_WINDOW: f"it is outside the time window {rule.window.text if rule.window else ''}"}[miss]
        return Verdict(False, policy.mode, rule, miss, f"no rule of agent {agent!r} for service {service!r} allows "
                       f"{method} {path} (closest: {rule.ref}: {why})")


def _invalid(files: tuple[str, ...], what: str) -> Verdict:
    return Verdict(False, "enforce", None, INVALID, f"{what} is invalid ({', '.join(files)}); requests fail "
                   "closed until an operator fixes it (`aegisctl policy list` shows the errors)")


def compile_set(files: Iterable[PolicyFile]) -> PolicySet:
    """Index `files` (each already parsed, invalid ones carrying every agent they name that is known).

    Adds an issue to every file of an agent whose applied files mix enforce and dry-run modes.
    """
    ordered = sorted(files, key=lambda f: f.name)
    by_agent: dict[str, list[PolicyFile]] = {}
    fail_all: list[str] = []
    for policy_file in ordered:
        if policy_file.valid and policy_file.mode == "off":
            continue
        if not policy_file.agents:
            fail_all.append(policy_file.name)
        for agent in policy_file.agents:  # one for a valid file; an invalid one fails closed for each it names
            by_agent.setdefault(agent, []).append(policy_file)
    agents: dict[str, AgentPolicy] = {}
    for agent, group in by_agent.items():
        modes = {f.mode for f in group if f.valid}
        if len(modes) > 1:
            listing = ", ".join(f"{f.name} ({f.mode})" for f in group if f.valid)
            for policy_file in group:
                if policy_file.valid:
                    policy_file.issues.append(Issue(policy_file.name, 0, 0, "mode", f"agent {agent!r} has files in "
                                                    f"different modes: {listing}; use one mode per agent"))
        invalid = tuple(f.name for f in group if not f.valid)
        rules: dict[str, list[Rule]] = {}
        for policy_file in group:
            for rule in policy_file.rules:
                rules.setdefault(rule.service, []).append(rule)
        mode = next(iter(modes)) if len(modes) == 1 else "enforce"
        longest = {service: judged_length(sum(r.paths.size for r in group_rules if r.paths is not None))
                   for service, group_rules in rules.items()}
        agents[agent] = AgentPolicy(agent, mode, {s: tuple(r) for s, r in rules.items()},
                                    tuple(f.name for f in group), invalid, longest)
    return PolicySet(agents, tuple(fail_all))
