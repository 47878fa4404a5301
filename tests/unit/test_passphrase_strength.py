"""The passphrase check refuses guessable passphrases, and leaves nothing of zxcvbn behind in the daemon."""

from __future__ import annotations

import sys

import pytest

from aegisd.errors import InvalidArgument
from aegisd.vault.vault import check_passphrase_strength


def _zxcvbn_loaded() -> list[str]:
    return [name for name in sys.modules if name == "zxcvbn" or name.startswith("zxcvbn.")]


def test_a_strong_passphrase_passes_and_zxcvbn_is_forgotten() -> None:
    check_passphrase_strength("vivid walrus ironing ochre tundra")
    assert _zxcvbn_loaded() == []


def test_a_weak_passphrase_is_refused_with_zxcvbn_warning_and_zxcvbn_is_forgotten() -> None:
    with pytest.raises(InvalidArgument, match=r"too weak \(This is similar to a commonly used password\)"):
        check_passphrase_strength("password12345")
    assert _zxcvbn_loaded() == []


def test_the_check_works_again_after_forgetting() -> None:
    check_passphrase_strength("vivid walrus ironing ochre tundra")
    with pytest.raises(InvalidArgument, match="too weak"):
        check_passphrase_strength("password12345")
