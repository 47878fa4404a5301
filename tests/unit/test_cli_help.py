"""What `aegisctl --help` tells an operator about defaults, which must match what each command does."""

from __future__ import annotations

import re

from click.testing import CliRunner

from aegisctl.cli import root


def _help(*verb: str) -> str:
    result = CliRunner().invoke(root, [*verb, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def test_update_does_not_claim_adds_defaults_for_options_it_leaves_alone() -> None:
    """Found by a cold review: `vault update --help` said [default: bearer], [default: *] and [default: block],
    which `update` never applies: an option left out leaves that setting as it is."""
    added, updated = _help("vault", "add"), _help("vault", "update")
    for option, default in (("--auth-type", "bearer"), ("--scopes", r"\*"), ("--body-inspection", "block")):
        assert re.search(rf"{option} .*?\[default: {default}\]", added), option
        assert re.search(rf"{option} .*?\[default: unchanged\]", updated), option
    assert "[default: bearer]" not in updated and "[default: block]" not in updated
