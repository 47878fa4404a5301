"""The new unlock key's file: written before the call, removed when aegisd refused it or nothing was sent,
kept (with a word on why) when the outcome is unknown; and the format the vault accepts."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from aegisctl.client import ClientError
from aegisctl.unlock_key_out import new_unlock_key as made_by_aegisctl
from aegisctl.unlock_key_out import unlock_key_out
from aegisd.errors import InvalidArgument
from aegisd.vault.unlock_key_format import check_unlock_key, new_unlock_key


def test_the_file_holds_the_key_before_the_call_and_after(tmp_path: Path) -> None:
    path = tmp_path / "k"
    with unlock_key_out(str(path)) as made:
        assert made is not None
        assert path.read_text() == made.key + "\n" and path.stat().st_mode & 0o777 == 0o600
        made.send(lambda key: key)
    assert path.read_text() == made.key + "\n"


@pytest.mark.parametrize("reason", ["wrong_passphrase", "invalid_argument", "vault_uninitialized",
                                    # Found by a cold review: both are raised before aegisd changes anything, yet
                                    # the file was kept with "aegisd may have taken it".
                                    "vault_changed", "key_slot_damaged"])
def test_a_refusal_removes_the_file(tmp_path: Path, reason: str) -> None:
    path = tmp_path / "k"
    with pytest.raises(ClientError), unlock_key_out(str(path)) as made:
        assert made is not None

        def refused(key: str) -> None:
            raise ClientError("no", reason=reason)

        made.send(refused)
    assert not path.exists()


@pytest.mark.parametrize("failure", [ClientError("gone", reason="unavailable"), ClientError("slow", reason="timeout"),
                                     ClientError("bug", reason="internal"), KeyboardInterrupt()])
def test_an_unknown_outcome_keeps_the_file_and_says_so(tmp_path: Path, failure: BaseException,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "k"
    with pytest.raises(type(failure)), unlock_key_out(str(path)) as made:
        assert made is not None

        def cut_off(key: str) -> None:
            raise failure

        made.send(cut_off)
    assert made is not None and path.read_text() == made.key + "\n"
    assert f"kept in {path}" in capsys.readouterr().err


def test_nothing_sent_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    with pytest.raises(KeyboardInterrupt), unlock_key_out(str(path)):
        raise KeyboardInterrupt  # Ctrl-C at the passphrase prompt: aegisd was asked nothing
    assert not path.exists()


def test_on_stdout_the_key_is_printed_once_aegisd_has_it_or_when_the_outcome_is_unknown(
        capsys: pytest.CaptureFixture[str]) -> None:
    with unlock_key_out("-") as made:
        assert made is not None

        def call(key: str) -> str:
            assert capsys.readouterr().out == ""  # not before aegisd has it
            return key

        made.send(call)
        made.taken()
        assert capsys.readouterr().out == made.key + "\n"  # at once, inside the block: no Ctrl-C window after
    made.delivered()
    assert capsys.readouterr().out == ""
    with pytest.raises(ClientError), unlock_key_out("-") as cut:
        assert cut is not None

        def gone(key: str) -> None:
            raise ClientError("gone", reason="unavailable")

        cut.send(gone)
    assert cut is not None and capsys.readouterr().out == cut.key + "\n"


def test_a_key_an_older_aegisd_made_itself_replaces_the_one_sent(tmp_path: Path) -> None:
    path = tmp_path / "k"
    with unlock_key_out(str(path)) as made:
        assert made is not None
        made.send(lambda key: key)
        theirs = made_by_aegisctl()
        made.taken(theirs)
    assert path.read_text() == theirs + "\n" and made.key == theirs
    assert path.stat().st_mode & 0o777 == 0o600 and [p.name for p in tmp_path.iterdir()] == ["k"]


def test_on_stdout_only_the_key_aegisd_kept_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with unlock_key_out("-") as made:
        assert made is not None
        made.send(lambda key: key)
        theirs = made_by_aegisctl()
        made.taken(theirs)
    assert capsys.readouterr().out == theirs + "\n"


def test_an_existing_file_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("precious\n")
    with pytest.raises(click.UsageError, match="already exists"), unlock_key_out(str(path)):
        pass
    assert path.read_text() == "precious\n"


def test_the_vault_takes_only_keys_new_unlock_key_would_make() -> None:
    check_unlock_key(new_unlock_key())
    check_unlock_key(made_by_aegisctl())  # aegisctl makes its own (it imports only the API from aegisd)
    key = new_unlock_key()
    for bad in ("", "aegis-unlock-", key[:-1], key + "A", key.replace("aegis-unlock-", "aegis-unlock_"),
                "aegis-unlock-" + "A" * 42 + "=", "aegis-unlock-" + "!" * 43, "password123"):
        with pytest.raises(InvalidArgument):
            check_unlock_key(bad)


def test_with_stdout_closed_the_key_goes_to_a_private_file(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Found by a cold review: with fd 1 closed sys.stdout is None and click.echo drops what it is given."""
    monkeypatch.setattr("sys.stdout", None)
    with unlock_key_out("-") as made:
        assert made is not None
        made.send(lambda key: key)
        made.taken()
    err = capsys.readouterr().err
    path = Path(err.split(" is in ")[1].split(" (mode")[0])
    try:
        assert path.read_text() == made.key + "\n" and path.stat().st_mode & 0o777 == 0o600
        assert made.key not in err
    finally:
        path.unlink()


def test_aegisds_own_key_is_kept_when_its_file_cannot_be_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    def full_disk(path: Path, text: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("aegisctl.unlock_key_out._replace_file", full_disk)
    with unlock_key_out(str(tmp_path / "k")) as made:
        assert made is not None
        made.send(lambda key: key)
        theirs = made_by_aegisctl()
        made.taken(theirs)
    err = capsys.readouterr().err
    path = Path(err.split(" is in ")[1].split(" (mode")[0])
    try:
        assert path.read_text() == theirs + "\n" and made.key == theirs and theirs not in err
    finally:
        path.unlink()


def test_an_empty_path_is_a_usage_error_not_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty path used to read as "no unlock key wanted" (a vault made without one) or trip an assert."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(click.UsageError, match="empty"), unlock_key_out(""):
        pytest.fail("an empty path must not yield")
    assert list(tmp_path.iterdir()) == []
