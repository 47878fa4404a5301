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


def test_every_verb_loads_under_its_own_name_and_only_when_asked_for() -> None:
    """The verbs are imported lazily from COMMANDS: each entry must name a command that calls itself by that
    name (a typo would make the verb vanish from --help), and importing the root must not import them."""
    import subprocess
    import sys

    import click

    from aegisctl.cli import COMMANDS

    ctx = click.Context(root)
    for name in COMMANDS:
        command = root.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name, name
    assert root.get_command(ctx, "no-such-verb") is None
    listed = _help()
    for name in COMMANDS:
        assert f" {name} " in listed, name
    probe = ("import sys; import aegisctl.cli; "
             "print(sorted(m for m in sys.modules if m.startswith('aegisctl.commands.')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
