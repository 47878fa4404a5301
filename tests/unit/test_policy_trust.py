"""Who could change the policy directory: its owner and mode, those of every directory above it, as configured
and where its symlinks lead; a symbolic link on the way is judged by its owner alone (its mode means nothing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aegisd.policy.store import untrusted


def test_a_symlink_on_the_way_is_judged_by_its_owner_not_its_mode(tmp_path: Path) -> None:
    (tmp_path / "real" / "policies").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")  # a link's mode reads 0777 on Linux: /tmp on macOS is one
    assert untrusted(tmp_path / "link" / "policies") is None


def test_a_directory_others_may_write_is_named(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    policies.chmod(0o777)
    assert untrusted(policies) == f"the policy directory {policies} is writable by group or others (mode 0777)"
    policies.chmod(0o755)
    tmp_path.chmod(0o777)  # above it, not sticky
    assert f"{tmp_path}, above the policy directory" in (untrusted(policies) or "")
    tmp_path.chmod(0o1777)  # sticky, as /tmp
    assert untrusted(policies) is None
    tmp_path.chmod(0o700)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to give a directory to another user")
def test_where_a_symlink_leads_is_walked_too(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "policies").mkdir(parents=True)
    os.chown(theirs, 4242, 4242)
    (tmp_path / "link").symlink_to(theirs / "policies")
    assert f"{theirs}, above the policy directory {theirs / 'policies'}, belongs to uid 4242" in (
        untrusted(tmp_path / "link") or "")
