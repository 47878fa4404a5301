"""Counting the work a call does instead of timing it: unit tests assert no times, and a count is the same on a
loaded machine as on an idle one.

`counted()` counts, while its block runs in this thread, the lines of aegisd's own Python code that run (a loop
over a body's fields or over the lengths of a tail is one line or more per turn) and every call of a compiled
regular expression's methods, whichever module makes it (a backtracking `re` search is one call, however long
it takes: a test can insist there is none where only Hyperscan, linear by construction, may read the data).
Past `budget` lines it raises WorkBudgetExceeded, so a super-linear loop fails at once instead of running on.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aegisd

AEGISD_CODE = str(Path(aegisd.__file__).resolve().parent) + os.sep


class WorkBudgetExceeded(Exception):
    pass


@dataclass
class Work:
    lines: int = 0  # lines of aegisd's Python code run
    regex_calls: list[tuple[str, str | bytes]] = field(default_factory=list)  # (method, pattern) per call


@contextmanager
def counted(budget: int | None = None) -> Iterator[Work]:
    work = Work()

    def line(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            work.lines += 1
            if budget is not None and work.lines > budget:
                raise WorkBudgetExceeded(f"more than {budget} lines of aegisd's code ran")
        return line

    def call(frame: FrameType, event: str, arg: Any) -> Any:
        return line if frame.f_code.co_filename.startswith(AEGISD_CODE) else None

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "c_call" and isinstance(pattern := getattr(arg, "__self__", None), re.Pattern):
            work.regex_calls.append((arg.__name__, pattern.pattern))

    before = sys.gettrace(), sys.getprofile()
    sys.settrace(call)
    sys.setprofile(profile)
    try:
        yield work
    finally:
        sys.settrace(before[0])
        sys.setprofile(before[1])
