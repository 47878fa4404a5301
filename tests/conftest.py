"""Fixtures: a real aegisd per test, on its own temp directory, socket and gate port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import Aegis, new_aegis


@pytest.fixture
def aegis() -> Iterator[Aegis]:
    """A started daemon with no vault yet."""
    instance = new_aegis()
    instance.start()
    yield instance
    instance.cleanup()


@pytest.fixture
def unlocked(aegis: Aegis) -> Aegis:
    """A started daemon with an initialised, unlocked vault."""
    aegis.init()
    return aegis


@pytest.fixture
def fresh() -> Iterator[Aegis]:
    """A daemon not yet started, for tests of start-up itself."""
    instance = new_aegis()
    yield instance
    instance.cleanup()
