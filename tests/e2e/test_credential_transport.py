"""Where a credential may travel in clear: plain `http://` allowlist entries to hosts off this machine need
`--allow-plain-http` (the webhooks' loopback rule), entries stored before that rule keep working, and
link-local or cloud-metadata entries are accepted with a warning in the log."""

from __future__ import annotations

import http.client
import json

from aegisd.vault.credentials import Credential
from tests.e2e.support import assert_failed, names_in_process, open_vault, show_in_process
from tests.harness import PASSPHRASE, Aegis

SECRET = "sk-live-plainHttpSecret-5c1e9a77b3"
LEGACY_SECRET = "sk-live-legacyPlainSecret-0d4b2e6f"


def add(aegis: Aegis, name: str, domains: str, *args: str) -> tuple[int, str, str]:
    result = aegis.ctl_in_process("vault", "add", name, "--service", name, "--domains", domains, "--secret-stdin",
                                  *args, input=SECRET + "\n")
    return result.code, result.out, result.err


def test_plain_http_off_the_machine_needs_the_flag(unlocked: Aegis) -> None:
    for domains in ("http://api.example.com", "api.example.com,http://10.0.0.5:8080", "http://localhost.example"):
        result = unlocked.ctl("vault", "add", "plain", "--service", "plain", "--domains", domains, "--secret-stdin",
                              input=SECRET + "\n")
        assert_failed(result, "--allow-plain-http", "plain http://", "unencrypted")
    assert names_in_process(unlocked) == []
    # Loopback, as for webhooks: 127.0.0.0/8, [::1], localhost (and https anywhere) need no flag.
    code, _, err = add(unlocked, "local", "http://127.0.0.1:8080,http://127.9.9.9,http://[::1]:9000,"
                                          "http://localhost:3000,https://api.example.com")
    assert code == 0, err
    assert show_in_process(unlocked, "local")["domains"] == ["http://127.0.0.1:8080", "http://127.9.9.9",
                                                             "http://[::1]:9000", "http://localhost:3000",
                                                             "api.example.com"]
    # With the flag it is accepted, and the log says so (names only).
    code, _, err = add(unlocked, "plain", "http://api.example.com", "--allow-plain-http")
    assert code == 0, err
    assert show_in_process(unlocked, "plain")["domains"] == ["http://api.example.com"]
    log = unlocked.log()
    assert "plain http to a host off this machine" in log and "credential=plain" in log
    assert "entry=http://api.example.com" in log

    # `vault update --domains` is checked the same way, a change to anything else is not.
    assert_failed(unlocked.ctl_in_process("vault", "update", "local", "--domains", "http://api.example.com"),
                  "--allow-plain-http")
    assert show_in_process(unlocked, "local")["domains"][0] == "http://127.0.0.1:8080"
    assert unlocked.ctl_in_process("vault", "update", "plain", "--scopes", "read").ok()
    assert show_in_process(unlocked, "plain")["scopes"] == ["read"]
    assert unlocked.ctl("vault", "update", "local", "--domains", "http://api.example.org",
                        "--allow-plain-http", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert show_in_process(unlocked, "local")["domains"] == ["http://api.example.org"]
    assert_failed(unlocked.ctl_in_process("vault", "update", "plain", "--allow-plain-http"), "--domains", code=2)
    assert "--allow-plain-http" in unlocked.ctl_in_process("vault", "add", "--help").ok().out
    unlocked.assert_no_leaks([PASSPHRASE, SECRET])


def test_link_local_and_metadata_entries_are_warned_about(unlocked: Aegis) -> None:
    code, _, err = add(unlocked, "meta", "169.254.169.254,[fd00:ec2::254],169.254.10.1:8443")
    assert code == 0, err
    warnings = [line for line in unlocked.log().splitlines() if "link-local or cloud metadata" in line]
    assert len(warnings) == 3 and all("warning" in line and "credential=meta" in line for line in warnings)
    assert any("entry=169.254.169.254" in line for line in warnings)
    assert any("entry=[fd00:ec2::254]" in line for line in warnings)
    # An ordinary host is not warned about.
    add(unlocked, "plainjane", "api.example.com")
    assert "credential=plainjane entry=" not in unlocked.log()
    unlocked.assert_no_leaks([PASSPHRASE, SECRET])


def test_a_plain_http_credential_stored_before_the_rule_keeps_working(fresh: Aegis) -> None:
    """A row an aegisd without the rule wrote (through the vault itself, as it did) is served, passes doctor,
    and can be updated in its other fields; only replacing its list asks for the flag."""
    fresh.start()
    fresh.init()
    assert fresh.stop() == 0
    with open_vault(fresh.data_dir) as vault:
        vault.add_credential(Credential(id="", name="legacy", service="legacy",
                                        domains=["http://legacy.invalid:8080"]), LEGACY_SECRET)
    fresh.start()
    fresh.ctl_in_process("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    listed = show_in_process(fresh, "legacy")
    assert listed["integrity"] == "ok" and listed["domains"] == ["http://legacy.invalid:8080"]
    doctor = json.loads(fresh.ctl_in_process("doctor", "--json").out)
    checks = {c["name"]: c["status"] for c in doctor["checks"]}
    assert checks["credentials_decrypt"] == "pass", doctor
    assert fresh.ctl_in_process("vault", "update", "legacy", "--rate-limit", "10/min").ok()
    assert show_in_process(fresh, "legacy")["rate_limit"] == "10/min"
    # The gate still routes it: past the allowlist, to the (unresolvable) upstream.
    token = fresh.ctl_in_process("agent", "add", "bot").ok().out.strip()
    fresh.ctl_in_process("grant", "bot", "legacy").ok()
    conn = http.client.HTTPConnection("127.0.0.1", fresh.gate_port, timeout=30)
    conn.request("GET", "/legacy/x", headers={"X-Aegis-Agent": token})
    answer = conn.getresponse()
    body = json.loads(answer.read())
    conn.close()
    assert answer.status == 502 and body["error"]["code"].startswith("upstream"), body
    assert_failed(fresh.ctl_in_process("vault", "update", "legacy", "--domains", "http://legacy.invalid:8080"),
                  "--allow-plain-http")
    fresh.assert_no_leaks([PASSPHRASE, LEGACY_SECRET])
