"""Changing what opens the vault after `init`: `aegisctl passphrase`, `aegisctl unlock-key new|remove`.

A real aegisd and the real aegisctl: every change needs the current passphrase, takes effect at once
(the old secret stops opening the vault, the new one opens it, across a restart), leaves the vault
locked or unlocked as it was, is recorded in the ledger, and never shows a passphrase or key anywhere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.e2e.support import status
from tests.harness import AEGISCTL, PASSPHRASE, Aegis, new_aegis

NEW_PASSPHRASE = "a completely different passphrase 4417"
SECRET = "sk-vault-keys-secret-0123456789abcdef"


@pytest.fixture
def aegis() -> Iterator[Aegis]:
    instance = new_aegis()
    instance.start()
    instance.init()
    instance.add_credential("svc", SECRET, "--service", "svc", "--domains", "svc.example")
    yield instance
    instance.cleanup()


def unlocks_with(aegis: Aegis, *, passphrase: str | None = None, key: str | None = None) -> bool:
    """Whether the locked vault opens with this secret (left locked again either way)."""
    assert aegis.ctl("lock").code == 0
    if passphrase is not None:
        result = aegis.ctl("unlock", "--passphrase-stdin", input=passphrase + "\n")
    else:
        result = aegis.ctl("unlock", "--unlock-key-stdin", input=f"{key}\n")
    if result.code == 0:
        aegis.ctl("lock").ok()
        return True
    assert "wrong" in result.err or "has no unlock key" in result.err, result.err
    return False


def key_rows(aegis: Aegis) -> list[str]:
    rows = json.loads(aegis.ctl("ledger", "show", "--json", "--limit", "1000").ok().out)
    return [r["detail"] for r in sorted(rows, key=lambda r: r["id"]) if r["reason"] == "vault_keys_changed"]


def test_passphrase_change_takes_effect_and_keeps_the_state(aegis: Aegis) -> None:
    changed = aegis.ctl("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{NEW_PASSPHRASE}\n").ok()
    assert "Passphrase changed" in changed.out
    assert status(aegis)["state"] == "unlocked"  # it stays unlocked
    assert not unlocks_with(aegis, passphrase=PASSPHRASE)
    assert unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
    # Locked, it stays locked: proving the passphrase is not unlocking. Back to the first one.
    aegis.ctl("passphrase", "--passphrase-stdin", input=f"{NEW_PASSPHRASE}\n{PASSPHRASE}\n").ok()
    assert status(aegis)["state"] == "locked"
    assert aegis.stop() == 0
    aegis.start()
    assert unlocks_with(aegis, passphrase=PASSPHRASE) and not unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
    aegis.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert key_rows(aegis) == ["vault passphrase changed"] * 2
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, SECRET])


def test_passphrase_change_refuses_a_wrong_or_weak_or_same_passphrase(aegis: Aegis) -> None:
    wrong = aegis.ctl("passphrase", "--passphrase-stdin", input=f"not the passphrase at all\n{NEW_PASSPHRASE}\n")
    assert wrong.code == 1 and "wrong passphrase" in wrong.err, wrong
    weak = aegis.ctl("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\nshort\n")
    assert weak.code == 1 and "passphrase" in weak.err, weak
    same = aegis.ctl("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{PASSPHRASE}\n")
    assert same.code == 1 and "is the current one" in same.err, same
    one_line = aegis.ctl("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n")
    assert one_line.code == 2 and "empty" in one_line.err, one_line
    assert unlocks_with(aegis, passphrase=PASSPHRASE)  # nothing changed
    assert key_rows(aegis) == []
    assert "vault key change refused: wrong passphrase" in aegis.log()
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, "not the passphrase at all", SECRET])


def test_unlock_key_new_replaces_and_remove_ends_them(aegis: Aegis) -> None:
    first_file = aegis.root / "first.key"
    made = aegis.ctl("unlock-key", "new", "--out", str(first_file), "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "New unlock key created." in made.out and "replaces" not in made.out
    assert first_file.stat().st_mode & 0o777 == 0o600
    first = first_file.read_text().strip()
    assert unlocks_with(aegis, key=first)

    # On stdout the key stands alone (KEY=$(...)); it replaces the first, which stops working at once.
    second_run = aegis.ctl("unlock-key", "new", "--out", "-", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    second = second_run.out.strip()
    aegis.outputs.remove(second_run.out)  # the one place the key is meant to be shown; checked for leaks nowhere else
    assert second.startswith("aegis-unlock-") and "\n" not in second and second != first
    assert "replaces 1 unlock key" in second_run.err
    assert not unlocks_with(aegis, key=first) and unlocks_with(aegis, key=second)

    # A daemon started with the new key comes up unlocked.
    aegis.stop()
    aegis.start(env={"AEGIS_UNLOCK_KEY": second})
    assert status(aegis)["state"] == "unlocked"

    removed = aegis.ctl("unlock-key", "remove", "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "Removed 1 unlock key" in removed.out
    assert not unlocks_with(aegis, key=second) and unlocks_with(aegis, passphrase=PASSPHRASE)
    again = aegis.ctl("unlock-key", "remove", "--yes", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert "had no unlock key" in again.out
    aegis.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    assert key_rows(aegis) == ["vault unlock key replaced (0 before)", "vault unlock key replaced (1 before)",
                               "vault unlock keys removed (1 before)", "vault unlock keys removed (0 before)"]
    aegis.assert_no_leaks([PASSPHRASE, first, second, SECRET])


def test_unlock_key_changes_need_the_passphrase_and_lose_nothing(aegis: Aegis) -> None:
    key_file = aegis.root / "init.key"
    aegis.stop()
    aegis.cleanup()
    aegis.root.mkdir(parents=True)
    aegis.start()
    aegis.init(PASSPHRASE, "--unlock-key-out", str(key_file))
    key = key_file.read_text().strip()

    out = aegis.root / "new.key"
    wrong = aegis.ctl("unlock-key", "new", "--out", str(out), "--passphrase-stdin", input="a wrong passphrase here\n")
    assert wrong.code == 1 and "wrong passphrase" in wrong.err, wrong
    assert not out.exists()  # the file made before the call is gone again: no empty key file left behind
    taken = aegis.ctl("unlock-key", "new", "--out", str(key_file), "--passphrase-stdin", input=PASSPHRASE + "\n")
    assert taken.code == 2 and "already exists" in taken.err  # refused before anything changed
    no_yes = aegis.ctl("unlock-key", "remove", "--passphrase-stdin", input=PASSPHRASE + "\n")
    assert no_yes.code == 2 and "--yes" in no_yes.err
    wrong_remove = aegis.ctl("unlock-key", "remove", "--yes", "--passphrase-stdin", input="a wrong passphrase here\n")
    assert wrong_remove.code == 1 and "wrong passphrase" in wrong_remove.err
    assert unlocks_with(aegis, key=key)  # the key from init still works: nothing was replaced or removed
    aegis.assert_no_leaks([PASSPHRASE, key])


@pytest.mark.parametrize("delay", [0.05, 0.25, 0.6])
def test_unlock_key_new_cut_off_at_any_moment_never_loses_the_working_key(aegis: Aegis, delay: float) -> None:
    """Ctrl-C at some moment of `unlock-key new` (before the call, during Argon2 on the daemon's side, after):
    whatever the daemon did, a key that opens the vault is still at hand: the old one, or the new one in its file."""
    first_file = aegis.root / "first.key"
    aegis.ctl("unlock-key", "new", "--out", str(first_file), "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    first = first_file.read_text().strip()
    new_file = aegis.root / "new.key"
    proc = subprocess.Popen([AEGISCTL, "unlock-key", "new", "--out", str(new_file), "--passphrase-stdin"],
                            env=aegis.base_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None
    proc.stdin.write(PASSPHRASE + "\n")
    proc.stdin.flush()
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    aegis.outputs.extend([out, err])
    time.sleep(1.0)  # a call the daemon had begun finishes on its side even though the client is gone
    old_works = unlocks_with(aegis, key=first)
    new_key = new_file.read_text().strip() if new_file.exists() else None
    new_works = new_key is not None and unlocks_with(aegis, key=new_key)
    assert old_works or new_works, (delay, proc.returncode, err)
    if not old_works:  # the daemon replaced it: the replacement must be in the file
        assert new_works, err
    if new_file.exists() and not new_works:
        assert "may have taken it" in err or proc.returncode == 0, err  # kept only with a word on why
    aegis.assert_no_leaks([PASSPHRASE, first, *([new_key] if new_key else [])])


def test_restoring_an_older_backup_of_this_vault_does_not_bring_back_its_keys(aegis: Aegis) -> None:
    """Restore needs only the socket: it must not undo a passphrase change or a replaced (leaked) unlock key,
    which needed the passphrase. A backup of this vault comes back with the vault's current key slots."""
    leaked_file = aegis.root / "leaked.key"
    aegis.ctl("unlock-key", "new", "--out", str(leaked_file), "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
    leaked = leaked_file.read_text().strip()
    backup = aegis.root / "before.backup"
    aegis.ctl("backup", str(backup)).ok()
    aegis.ctl("passphrase", "--passphrase-stdin", input=f"{PASSPHRASE}\n{NEW_PASSPHRASE}\n").ok()
    current_file = aegis.root / "current.key"
    aegis.ctl("unlock-key", "new", "--out", str(current_file), "--passphrase-stdin",
              input=NEW_PASSPHRASE + "\n").ok()
    current = current_file.read_text().strip()
    aegis.ctl("vault", "remove", "svc", "--yes").ok()  # so the restore visibly brings the backup's rows back

    aegis.ctl("lock").ok()
    restored = aegis.ctl("restore", str(backup), "--yes").ok()
    assert "kept its current passphrase and unlock keys" in restored.out, restored.out
    assert not unlocks_with(aegis, passphrase=PASSPHRASE) and not unlocks_with(aegis, key=leaked)
    assert unlocks_with(aegis, passphrase=NEW_PASSPHRASE) and unlocks_with(aegis, key=current)
    aegis.ctl("unlock", "--passphrase-stdin", input=NEW_PASSPHRASE + "\n").ok()
    assert [c["name"] for c in json.loads(aegis.ctl("vault", "list", "--json").ok().out)] == ["svc"]
    rows = json.loads(aegis.ctl("ledger", "show", "--json", "--limit", "20").ok().out)
    assert any(r["reason"] == "backup_restored" and "kept its current passphrase" in r["detail"] for r in rows)
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, leaked, current, SECRET])


def test_another_vaults_backup_opens_with_its_own_passphrase(aegis: Aegis) -> None:
    other = new_aegis()
    try:
        other.start()
        other.init(NEW_PASSPHRASE)
        backup = aegis.root / "other.backup"
        other.ctl("backup", str(backup)).ok()
    finally:
        other.cleanup()
    aegis.ctl("lock").ok()
    restored = aegis.ctl("restore", str(backup), "--yes").ok()
    assert "unlock it with the backup's passphrase" in restored.out, restored.out
    assert not unlocks_with(aegis, passphrase=PASSPHRASE) and unlocks_with(aegis, passphrase=NEW_PASSPHRASE)
    aegis.assert_no_leaks([PASSPHRASE, NEW_PASSPHRASE, SECRET])
