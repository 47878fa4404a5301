"""Agents and grants through the real daemon, driven only by aegisctl: tokens shown once, never stored."""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

from tests.harness import PASSPHRASE, Aegis

TOKEN_RE = re.compile(r"^aegis_[A-Za-z0-9_-]{43}$")
GH_SECRET = "ghp_agentsTestSecret0123456789abcdef"
OA_SECRET = "sk-agentsTestSecret0123456789abcdef"


def status(aegis: Aegis) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(aegis.ctl_in_process("status", "--json").ok().out)
    return result


def add_credentials(aegis: Aegis) -> None:
    aegis.add_credential("github", GH_SECRET, "--service", "github", "--domains", "api.github.com")
    aegis.add_credential("openai", OA_SECRET, "--service", "openai", "--domains", "api.openai.com")


def agent_add(aegis: Aegis, name: str, *, as_program: bool = False) -> str:
    """`agent add NAME`'s token; run in this process unless `as_program` (the real aegisctl)."""
    result = (aegis.ctl("agent", "add", name) if as_program else aegis.ctl_in_process("agent", "add", name)).ok()
    token = result.out.strip()
    assert TOKEN_RE.match(token), result.out
    assert result.out == token + "\n"  # the token alone on stdout, so $(aegisctl agent add) captures it
    assert "not shown again" in result.err
    return token


def token_hashes(aegis: Aegis) -> dict[str, bytes]:
    conn = sqlite3.connect(f"file:{aegis.data_dir / 'vault.db'}?mode=ro", uri=True)
    try:
        return {name: bytes(h) for name, h in conn.execute("SELECT name, token_hash FROM agents")}
    finally:
        conn.close()


def test_add_prints_token_once(unlocked: Aegis) -> None:
    aegis = unlocked
    token = agent_add(aegis, "claude", as_program=True)
    as_json = json.loads(aegis.ctl("agent", "add", "cursor", "--json").ok().out)
    assert set(as_json) == {"name", "token"} and as_json["name"] == "cursor"
    assert TOKEN_RE.match(as_json["token"]) and as_json["token"] != token

    listed = aegis.ctl("agent", "list").ok()
    listed_json = json.loads(aegis.ctl_in_process("agent", "list", "--json").ok().out)
    shown = aegis.ctl("agent", "show", "claude").ok()
    shown_json = json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)
    assert [a["name"] for a in listed_json] == ["claude", "cursor"]
    assert "claude" in listed.out and "cursor" in listed.out
    assert shown_json["name"] == "claude" and shown_json["credentials"] == []
    assert shown_json["created_at"] and shown_json["rotated_at"]
    assert "created" in shown.out
    for text in (listed.out, shown.out, json.dumps(listed_json), json.dumps(shown_json)):
        assert "aegis_" not in text

    hashes = token_hashes(aegis)
    assert set(hashes) == {"claude", "cursor"}
    for name, secret in (("claude", token), ("cursor", as_json["token"])):
        assert len(hashes[name]) == 32 and hashes[name] != secret.encode() and secret.encode() not in hashes[name]
    assert status(aegis)["agents"] == 2

    duplicate = aegis.ctl_in_process("agent", "add", "claude")
    assert duplicate.code == 1 and "already an agent named 'claude'" in duplicate.err
    assert "agent regenerate" in duplicate.err
    for name in ("Not Valid", "claude\n"):  # a final line break too: it would read as another name in listings
        bad = aegis.ctl_in_process("agent", "add", name)
        assert bad.code == 1 and "agent name" in bad.err, (name, bad)

    assert aegis.stop() == 0
    # Tokens appear in exactly the outputs that printed them; drop those, then nothing else may hold them.
    aegis.outputs = [o for o in aegis.outputs if token not in o and as_json["token"] not in o]
    aegis.assert_no_leaks([token, as_json["token"]])


def test_regenerate_changes_token(unlocked: Aegis) -> None:
    aegis = unlocked
    old = agent_add(aegis, "claude")
    old_hash = token_hashes(aegis)["claude"]
    before = json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)
    result = aegis.ctl("agent", "regenerate", "claude").ok()
    new = result.out.strip()
    assert TOKEN_RE.match(new) and new != old and "not shown again" in result.err
    assert token_hashes(aegis)["claude"] != old_hash
    after = json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)
    assert after["created_at"] == before["created_at"] and after["rotated_at"] >= before["rotated_at"]
    again = json.loads(aegis.ctl_in_process("agent", "regenerate", "claude", "--json").ok().out)
    assert again["name"] == "claude" and again["token"] not in (old, new)
    missing = aegis.ctl_in_process("agent", "regenerate", "ghost")
    assert missing.code == 1 and "no agent named 'ghost'" in missing.err and "aegisctl agent list" in missing.err

    assert aegis.stop() == 0
    tokens = [old, new, again["token"]]
    aegis.outputs = [o for o in aegis.outputs if not any(t in o for t in tokens)]
    aegis.assert_no_leaks(tokens)


def test_grant_revoke_and_cascades(unlocked: Aegis) -> None:
    aegis = unlocked
    add_credentials(aegis)
    agent_add(aegis, "claude")
    agent_add(aegis, "cursor")

    first = aegis.ctl("grant", "claude", "github").ok()
    assert "Granted" in first.out
    again = aegis.ctl_in_process("grant", "claude", "github").ok()
    assert "already" in again.out
    aegis.ctl_in_process("grant", "claude", "openai").ok()
    aegis.ctl_in_process("grant", "cursor", "github").ok()
    assert status(aegis)["grants"] == 3
    shown = json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)
    assert shown["credentials"] == ["github", "openai"]
    assert "github, openai" in aegis.ctl_in_process("agent", "show", "claude").ok().out

    aegis.ctl("revoke", "claude", "openai").ok()
    assert json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)["credentials"] == ["github"]
    assert status(aegis)["grants"] == 2
    # Found by a new user: revoking twice failed (exit 1) while granting twice succeeds. Both are idempotent now.
    gone = aegis.ctl_in_process("revoke", "claude", "openai").ok()
    assert gone.out == "Agent 'claude' has no grant of credential 'openai'; nothing changed.\n", gone.out
    assert gone.err == ""
    assert status(aegis)["grants"] == 2

    # Removing an agent takes its grants; scripts must say --yes.
    refused = aegis.ctl("agent", "remove", "claude")
    assert refused.code == 2 and "--yes" in refused.err
    removed = aegis.ctl("agent", "remove", "claude", "--yes").ok()
    assert "1 grants removed" in removed.out
    counts = status(aegis)
    assert (counts["agents"], counts["grants"]) == (1, 1)
    listed = json.loads(aegis.ctl_in_process("agent", "list", "--json").ok().out)
    assert [a["name"] for a in listed] == ["cursor"]

    # Removing a credential takes its grants too.
    aegis.ctl_in_process("vault", "remove", "github", "--yes").ok()
    assert json.loads(aegis.ctl_in_process("agent", "show", "cursor", "--json").ok().out)["credentials"] == []
    assert status(aegis)["grants"] == 0


def test_unknown_names_fail_clearly(unlocked: Aegis) -> None:
    aegis = unlocked
    add_credentials(aegis)
    agent_add(aegis, "claude")
    cases = [
        (("grant", "ghost", "github"), "no agent named 'ghost'", "aegisctl agent list"),
        (("grant", "claude", "nope"), "no credential named 'nope'", "aegisctl vault list"),
        (("revoke", "ghost", "github"), "no agent named 'ghost'", "aegisctl agent list"),
        (("revoke", "claude", "nope"), "no credential named 'nope'", "aegisctl vault list"),
        (("agent", "show", "ghost"), "no agent named 'ghost'", "aegisctl agent list"),
        (("agent", "remove", "ghost", "--yes"), "no agent named 'ghost'", "aegisctl agent list"),
    ]
    for args, message, hint in cases:
        result = aegis.ctl_in_process(*args)
        assert result.code == 1, (args, result)
        assert message in result.err and hint in result.err, (args, result.err)
        assert "Traceback" not in result.err
    usage = aegis.ctl_in_process("grant", "claude")
    assert usage.code == 2
    # Found by a cold review: an empty rate (an unset shell variable) removed the agent's limit, with success.
    aegis.ctl_in_process("agent", "set-rate-limit", "claude", "10/min").ok()
    for blank in ("", " "):
        refused = aegis.ctl_in_process("agent", "set-rate-limit", "claude", blank)
        assert refused.code == 2 and "or 'none' for no limit (nothing was sent)" in refused.err, refused
    assert json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)["rate_limit"] == "10/min"


def test_locked_vault_refuses_agent_changes(unlocked: Aegis) -> None:
    aegis = unlocked
    add_credentials(aegis)
    token = agent_add(aegis, "claude")
    aegis.ctl_in_process("lock").ok()
    for args in (("agent", "add", "other"), ("agent", "regenerate", "claude"), ("grant", "claude", "github"),
                 ("agent", "remove", "claude", "--yes")):
        result = aegis.ctl_in_process(*args)
        assert result.code == 1, (args, result)
        assert "locked" in result.err and "aegisctl unlock" in result.err
        assert "aegis_" not in result.out
    # Reads need no key, like `vault list`, but nothing can be authenticated while locked.
    assert [(a["name"], a["integrity"]) for a in json.loads(aegis.ctl_in_process("agent", "list",
                                                                                 "--json").ok().out)] == [
        ("claude", "unchecked")]
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)["integrity"] == "ok"
    assert token_hashes(aegis)["claude"] != token.encode()
    aegis.ctl_in_process("grant", "claude", "github").ok()


def test_no_vault_yet(aegis: Aegis) -> None:
    result = aegis.ctl_in_process("agent", "add", "claude")
    assert result.code == 1 and "aegisctl init" in result.err
    listed = aegis.ctl_in_process("agent", "list")
    assert listed.code == 1 and "aegisctl init" in listed.err


def test_no_agents_yet(unlocked: Aegis) -> None:
    assert "No agents yet" in unlocked.ctl_in_process("agent", "list").ok().out
    assert json.loads(unlocked.ctl_in_process("agent", "list", "--json").ok().out) == []


def test_a_credential_name_that_is_not_text_breaks_no_agent_listing(unlocked: Aegis) -> None:
    """Found by a cold review: a credential name edited in vault.db into bytes that are not UTF-8 (a BLOB) went
    straight into the API's string field, so `agent list`, `agent show` and `agent remove` failed with an
    internal error for every agent. It is now shown as the credential listing shows it, locked or unlocked."""
    aegis = unlocked
    add_credentials(aegis)
    agent_add(aegis, "claude")
    agent_add(aegis, "cursor")
    aegis.ctl_in_process("grant", "claude", "github").ok()
    aegis.ctl_in_process("grant", "cursor", "openai").ok()
    conn = sqlite3.connect(aegis.data_dir / "vault.db", timeout=10)
    try:
        with conn:
            conn.execute("UPDATE credentials SET name = X'FF' WHERE name = 'github'")
    finally:
        conn.close()
    shown_as = "b'\\xff'"
    assert shown_as in [c["name"] for c in json.loads(aegis.ctl_in_process("vault", "list", "--json").ok().out)]

    def listed() -> dict[str, Any]:
        return {a["name"]: a for a in json.loads(aegis.ctl_in_process("agent", "list", "--json").ok().out)}

    agents = listed()
    assert (agents["claude"]["credentials"], agents["claude"]["ignored_grants"]) == ([], [shown_as])
    assert agents["cursor"]["credentials"] == ["openai"]
    assert "claude" in aegis.ctl_in_process("agent", "list").ok().out
    assert json.loads(aegis.ctl_in_process("agent", "show", "claude",
                                           "--json").ok().out)["ignored_grants"] == [shown_as]
    aegis.ctl_in_process("lock").ok()
    agents = listed()
    assert agents["claude"]["credentials"] == [shown_as] and agents["claude"]["integrity"] == "unchecked"
    assert json.loads(aegis.ctl_in_process("agent", "show", "claude", "--json").ok().out)["credentials"] == [shown_as]
    aegis.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "1 grants removed" in aegis.ctl_in_process("agent", "remove", "claude", "--yes").ok().out
    assert list(listed()) == ["cursor"]
    assert "internal error" not in aegis.log().lower()
    aegis.assert_no_leaks([PASSPHRASE, GH_SECRET, OA_SECRET])
