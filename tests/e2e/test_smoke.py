"""The README walkthrough, end to end: init, add a credential, status."""

from __future__ import annotations

import json

from tests.harness import Aegis

SECRET = "ghp_walkthroughSecret0123456789abcdef"


def test_walkthrough(aegis: Aegis) -> None:
    assert json.loads(aegis.ctl("status", "--json").ok().out)["state"] == "uninitialized"
    aegis.init()
    aegis.add_credential("github", SECRET, "--service", "github", "--domains", "api.github.com")
    status = json.loads(aegis.ctl("status", "--json").ok().out)
    assert status["state"] == "unlocked"
    assert status["credentials"] == 1
    listed = json.loads(aegis.ctl("vault", "list", "--json").ok().out)
    assert [c["name"] for c in listed] == ["github"]
    assert aegis.stop() == 0
    aegis.assert_no_leaks([SECRET])
