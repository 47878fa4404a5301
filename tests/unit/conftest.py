"""Fixtures shared by the unit tests."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from tests.unit.event_loops import Run


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Tests run on the stock loop and on uvloop, the daemon's."""
    return Run(uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop)
