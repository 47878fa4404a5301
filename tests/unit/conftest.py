"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from aegisd.store import VaultStore
from aegisd.vault.vault import Vault
from tests.harness import PASSPHRASE
from tests.unit.event_loops import Run


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Tests run on the stock loop and on uvloop, the daemon's."""
    return Run(uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """An empty policy directory in the test's temp dir."""
    directory = tmp_path / "policies"
    directory.mkdir()
    return directory


@pytest.fixture
def store(tmp_path: Path) -> Iterator[VaultStore]:
    """A real vault database in the test's temp dir."""
    s = VaultStore(tmp_path / "vault.db")
    s.open()
    yield s
    s.close()


@pytest.fixture
def vault(store: VaultStore) -> Vault:
    """A vault on `store`, initialised and unlocked."""
    v = Vault(store)
    v.init(PASSPHRASE, False)
    return v
