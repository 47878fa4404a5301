"""The gate raises the open-file soft limit to what `[gate] max_connections` needs, and says when it cannot.

Each case runs in a child process, so the test process's own limits are never changed.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

CHILD = """
import logging, resource, sys
from aegisd.gate.server import raise_descriptor_limit
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
raise_descriptor_limit(int(sys.argv[2]))
print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def run_child(soft: int, wanted: int) -> list[str]:
    result = subprocess.run([sys.executable, "-c", CHILD, str(soft), str(wanted)], capture_output=True, text=True,
                            timeout=30, check=True)
    return result.stdout.splitlines()


HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
needs_room = pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD < 600, reason="hard open-file limit < 600")


@needs_room
def test_a_low_soft_limit_is_raised_to_what_is_wanted() -> None:
    assert run_child(300, 500) == ["soft 500"]


@needs_room
def test_a_higher_soft_limit_is_left_alone() -> None:
    assert run_child(550, 500) == ["soft 550"]


@pytest.mark.skipif(HARD == resource.RLIM_INFINITY, reason="no hard open-file limit to run into")
def test_past_the_hard_limit_it_raises_as_far_as_it_can_and_warns() -> None:
    lines = run_child(min(300, HARD), HARD + 1000)
    assert lines[-1] == f"soft {HARD}"
    assert lines[:-1] == [f"the open-file limit ({HARD}) is below the {HARD + 1000} that [gate] max_connections "
                          "needs; lower max_connections or raise the limit (LimitNOFILE= for systemd, ulimit -n)"]
