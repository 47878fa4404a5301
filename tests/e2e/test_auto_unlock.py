"""Auto-unlock at start: systemd credential, unlock key file (0600 only), AEGIS_UNLOCK_KEY; a bad or
unsafe key starts the daemon locked with a log line that says why, never a crash."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import status
from tests.harness import PASSPHRASE, Aegis, new_aegis

WRONG_KEY = "aegis-unlock-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture
def with_key() -> Iterator[tuple[Aegis, str]]:
    """A stopped daemon whose vault has a passphrase slot and an unlock-key slot."""
    instance = new_aegis()
    instance.start()
    key_file = instance.root / "init.key"
    instance.init(PASSPHRASE, "--unlock-key-out", str(key_file))
    instance.add_credential("svc", "sk-auto-unlock-secret-1234", "--service", "svc", "--domains", "svc.example")
    key = key_file.read_text().strip()
    key_file.unlink()
    assert instance.stop() == 0
    yield instance, key
    instance.cleanup()


def restart(aegis: Aegis, *args: str, env: dict[str, str] | None = None) -> str:
    """Start, return the vault state, stop."""
    aegis.log_path.unlink(missing_ok=True)
    aegis.start(*args, env=env)
    state = str(status(aegis)["state"])
    assert aegis.stop() == 0
    return state


def key_file(aegis: Aegis, name: str, key: str, mode: int) -> Path:
    path = aegis.root / name
    path.unlink(missing_ok=True)  # a read-only one left by an earlier step
    path.write_text(key + "\n")
    os.chmod(path, mode)
    return path


def test_without_a_key_source_starts_locked(with_key: tuple[Aegis, str]) -> None:
    aegis, key = with_key
    assert restart(aegis) == "locked"
    assert "auto-unlock" not in aegis.log()
    aegis.assert_no_leaks([PASSPHRASE, key, "sk-auto-unlock-secret-1234"])


def test_systemd_credentials_directory(with_key: tuple[Aegis, str]) -> None:
    aegis, key = with_key
    creds = aegis.root / "credentials"
    creds.mkdir(mode=0o700)
    # 0440: how systemd 256 and later show theirs (0400 and an ACL for the service's user, whose mask is the group
    # bits); found by a cold review: refused as "readable by group", so the packaged unit always started locked.
    for mode in (0o400, 0o440):
        key_file(aegis, "credentials/aegis-unlock", key, mode)
        assert restart(aegis, env={"CREDENTIALS_DIRECTORY": str(creds)}) == "unlocked"
        assert "vault unlocked" in aegis.log() and "aegis-unlock" in aegis.log()
    for mode in (0o460, 0o404):  # no more than the group's read (found by a review: 0444 was taken)
        key_file(aegis, "credentials/aegis-unlock", key, mode)
        assert restart(aegis, env={"CREDENTIALS_DIRECTORY": str(creds)}) == "locked"
        assert f"is readable by others or writable by group or others (mode {mode:o})" in aegis.log()
    aegis.assert_no_leaks([PASSPHRASE, key, "sk-auto-unlock-secret-1234"])


def test_unlock_key_file_0600(with_key: tuple[Aegis, str]) -> None:
    aegis, key = with_key
    path = key_file(aegis, "unlock.key", key, 0o600)
    assert restart(aegis, "--unlock-key-file", str(path)) == "unlocked"
    # ... and from the config file.
    config = aegis.root / "aegisd.toml"
    config.write_text(f'unlock_key_file = "{path}"\n')
    assert restart(aegis, "--config", str(config)) == "unlocked"
    aegis.assert_no_leaks([PASSPHRASE, key])


def test_unlock_key_file_readable_by_others_is_refused(with_key: tuple[Aegis, str]) -> None:
    aegis, key = with_key
    for mode in (0o644, 0o640, 0o604):
        path = key_file(aegis, f"unlock-{mode:o}.key", key, mode)
        assert restart(aegis, "--unlock-key-file", str(path)) == "locked"
        log = aegis.log()
        assert str(path) in log and "readable by group or others" in log and "chmod 600" in log
    aegis.assert_no_leaks([PASSPHRASE, key])


def test_missing_unlock_key_file_starts_locked(with_key: tuple[Aegis, str]) -> None:
    aegis, _ = with_key
    missing = aegis.root / "missing.key"
    assert restart(aegis, "--unlock-key-file", str(missing)) == "locked"
    assert f"{missing} does not exist" in aegis.log()


def test_environment_key(with_key: tuple[Aegis, str]) -> None:
    aegis, key = with_key
    assert restart(aegis, env={"AEGIS_UNLOCK_KEY": key}) == "unlocked"
    assert "via=AEGIS_UNLOCK_KEY" in aegis.log()
    aegis.assert_no_leaks([PASSPHRASE, key])


def test_wrong_key_starts_locked_with_a_log_line(with_key: tuple[Aegis, str]) -> None:
    aegis, key = with_key
    for env in ({"AEGIS_UNLOCK_KEY": WRONG_KEY}, {"AEGIS_UNLOCK_KEY": PASSPHRASE}):
        assert restart(aegis, env=env) == "locked"
        log = aegis.log()
        assert "auto-unlock from AEGIS_UNLOCK_KEY failed" in log and "starting locked" in log
        assert "Traceback" not in log
    path = key_file(aegis, "wrong.key", WRONG_KEY, 0o600)
    assert restart(aegis, "--unlock-key-file", str(path)) == "locked"
    assert f"auto-unlock from {path} failed" in aegis.log()
    # Still usable by hand afterwards.
    aegis.start()
    aegis.ctl("unlock", "--unlock-key-stdin", input=key + "\n").ok()
    assert status(aegis)["state"] == "unlocked"
    aegis.assert_no_leaks([PASSPHRASE, key, WRONG_KEY])


def test_systemd_credential_wins_over_the_environment(with_key: tuple[Aegis, str]) -> None:
    aegis, key = with_key
    creds = aegis.root / "credentials"
    creds.mkdir(mode=0o700)
    key_file(aegis, "credentials/aegis-unlock", key, 0o400)
    state = restart(aegis, env={"CREDENTIALS_DIRECTORY": str(creds), "AEGIS_UNLOCK_KEY": WRONG_KEY})
    assert state == "unlocked"
    assert "credentials/aegis-unlock" in aegis.log()
    aegis.assert_no_leaks([PASSPHRASE, key, WRONG_KEY])


def test_key_without_a_vault_is_ignored(fresh: Aegis) -> None:
    fresh.start(env={"AEGIS_UNLOCK_KEY": WRONG_KEY})
    assert status(fresh)["state"] == "uninitialized"
    assert "no vault exists yet" in fresh.log()
    assert fresh.stop() == 0
    fresh.assert_no_leaks([WRONG_KEY])
