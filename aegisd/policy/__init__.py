"""Policy files: which methods, paths and hours each agent may use per service (docs/policies.md)."""

from aegisd.policy.memory import MEMORY_FILE, PolicyMemory
from aegisd.policy.model import MODES, Issue, PolicyFile, Rule, TimeWindow
from aegisd.policy.parse import parse_policy
from aegisd.policy.policy_set import AgentPolicy, PolicySet, Verdict, compile_set
from aegisd.policy.store import PolicyStore, Snapshot

__all__ = ["MEMORY_FILE", "MODES", "AgentPolicy", "Issue", "PolicyFile", "PolicyMemory", "PolicySet", "PolicyStore",
           "Rule", "Snapshot", "TimeWindow", "Verdict", "compile_set", "parse_policy"]
