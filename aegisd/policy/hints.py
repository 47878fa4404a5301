"""Warnings about names in policy files that the daemon does not know: usually a typo, never an error.

A file for an agent that does not exist yet is allowed (docs/policies.md): it stays valid and loaded, and
governs the agent from the moment it is created. But `agent: my-agnet` meant for `my-agent` leaves
`my-agent` ungoverned without a word, and a rule for a service no credential provides can never apply. So
`policy validate|list|reload`, `policy test` and `doctor` warn about both, computed at each call from the
vault's rows, so a warning goes as soon as the agent or credential is created. Before `aegisctl init` there
is nothing to compare with, and nothing is warned about.

Agent names and credential services are stored in clear in vault.db (a MAC or seal covers them, checked
only while unlocked), so they are read here whatever the vault's state: every row counts, as `aegisctl agent
list` and `vault list` show it, so a row failing its check never causes a warning. No secret is read.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aegisd.errors import AegisError
from aegisd.policy.model import Issue, PolicyFile

if TYPE_CHECKING:
    from aegisd.store import VaultStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownNames:
    """The agents registered and the services some credential provides."""

    agents: frozenset[str]
    services: frozenset[str]


def known_names(store: VaultStore, initialized: bool) -> KnownNames | None:
    """What the vault holds now. None, so that nothing is warned about, before `aegisctl init` (there is no
    registry to compare with yet, and every name would be warned about) and when vault.db cannot be read (a
    damaged database: doctor's database check says so)."""
    if not initialized:
        return None
    try:
        with store.reading() as conn:
            agents = frozenset(str(row[0]) for row in conn.execute("SELECT name FROM agents"))
            services = frozenset(str(row[0]) for row in conn.execute("SELECT DISTINCT service FROM credentials"))
    except (AegisError, sqlite3.Error) as exc:
        log.warning("cannot read agent and service names for policy warnings: %s", type(exc).__name__)
        return None
    return KnownNames(agents, services)


def unknown_agent(agent: str) -> str:
    return f"no agent named {agent!r} (aegisctl agent list)"


def unknown_service(service: str) -> str:
    return f"no credential provides service {service!r} (aegisctl vault list)"


def file_warnings(policy_file: PolicyFile, known: KnownNames | None, *, brief: bool = False) -> list[Issue]:
    """The file's warnings: each agent it names that is not registered, then each rule whose service no
    credential provides (with the service's line and column). None when the names are not known. `brief`
    leaves out what to run and what it means (for doctor's one-line list)."""
    if known is None:
        return []
    name = policy_file.name
    missing = [agent for agent in policy_file.agents if agent not in known.agents]
    nobody = len(missing) == len(policy_file.agents)
    nobody_yet = "; the file applies to nobody yet" if nobody else ""
    warnings = [Issue(name, 0, 0, "", f"no agent named {agent!r}" if brief else (unknown_agent(agent) + nobody_yet))
                for agent in missing]
    for rule in policy_file.rules:
        if rule.service not in known.services:
            line, column = rule.service_at
            message = f"no credential provides service {rule.service!r}" if brief else (
                unknown_service(rule.service) + ": this rule can never apply (the gate refuses the service: 403 "
                "not_granted)")
            warnings.append(Issue(name, line, column, f"rules[{rule.index}].service", message))
    return warnings
