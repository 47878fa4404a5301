"""Process hardening: no core files, not dumpable (checked in a fresh interpreter, not in pytest)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import os, resource
from aegisd.hardening import harden_process, is_dumpable
before = is_dumpable()
harden_process()
print(before, is_dumpable(), resource.getrlimit(resource.RLIMIT_CORE), oct(os.umask(0o022)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_DUMPABLE) is Linux-only")
def test_harden_process_makes_the_process_not_dumpable() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "(0,", "0)", "0o77"]
    assert result.stderr == ""
