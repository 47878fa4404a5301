"""The passphrase check refuses guessable passphrases, and zxcvbn runs in a child, never in the daemon."""

from __future__ import annotations

import site
import sys

import pytest

from aegisd.errors import AegisError, InvalidArgument
from aegisd.vault import passphrase_strength
from aegisd.vault.passphrase_strength import check_passphrase_strength


def _zxcvbn_loaded() -> list[str]:
    return [name for name in sys.modules if name == "zxcvbn" or name.startswith("zxcvbn.")]


def test_a_strong_passphrase_passes_without_loading_zxcvbn_here() -> None:
    check_passphrase_strength("vivid walrus ironing ochre tundra")
    assert _zxcvbn_loaded() == []


def test_a_weak_passphrase_is_refused_with_zxcvbn_warning() -> None:
    with pytest.raises(InvalidArgument, match=r"too weak \(This is similar to a commonly used password\)"):
        check_passphrase_strength("password12345")
    assert _zxcvbn_loaded() == []


def test_a_short_passphrase_is_refused_before_any_child_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(InvalidArgument, match="at least 12 characters"):
        check_passphrase_strength("short")


def test_a_passphrase_longer_than_zxcvbn_takes_is_judged_not_an_error() -> None:
    """Found by a review: zxcvbn 4.5 refuses input past 72 characters, so a long diceware passphrase failed as
    "the strength check could not run", at init and at every change."""
    check_passphrase_strength("vivid walrus ironing ochre tundra gravel quince lantern moss harbour sprocket")
    with pytest.raises(InvalidArgument, match="too weak"):
        check_passphrase_strength("a" * 200)


def test_non_ascii_passphrases_reach_the_child_intact() -> None:
    check_passphrase_strength("Grüße aus Köln, 東京 und Zürich")


def test_a_child_that_cannot_run_is_an_error_not_a_pass(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(AegisError, match="could not run") as raised:
        check_passphrase_strength("vivid walrus ironing ochre tundra")
    assert not isinstance(raised.value, InvalidArgument)
    assert "could not start" in caplog.text and "walrus" not in caplog.text


def test_a_failing_child_is_an_error_and_its_output_is_not_logged(monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(passphrase_strength, "__name__", "aegisd.no_such_module")
    with pytest.raises(AegisError, match="could not run"):
        check_passphrase_strength("vivid walrus ironing ochre tundra")
    assert "exited 1" in caplog.text and "no_such_module" not in caplog.text


@pytest.mark.parametrize("user_site", [False, True])
def test_the_child_never_imports_from_the_cwd_or_python_env(monkeypatch: pytest.MonkeyPatch, user_site: bool) -> None:
    """`-m` alone puts the working directory first on sys.path and honours PYTHONPATH: the child ignores both,
    and takes the user's site-packages only when the daemon does (an aegisd installed with `pip --user`)."""
    monkeypatch.setattr(site, "ENABLE_USER_SITE", user_site)
    argv = passphrase_strength._child_argv()
    assert argv[0] == sys.executable and argv[-2:] == ["-m", "aegisd.vault.passphrase_strength"]
    assert {"-E", "-P"} <= set(argv) and ("-s" in argv) is not user_site
