"""Where the gate's time goes under load: py-spy samples the daemon while wrk drives it, and the
collapsed stacks are reduced to the top functions by own time and by inclusive time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_LINE = re.compile(r":\d+\)$")
_LOOP_FRAME = "Runner.run (asyncio/runners.py)"


def py_spy() -> str | None:
    return shutil.which("py-spy") or next(
        (str(p) for p in (Path(sys.executable).parent / "py-spy",) if p.is_file()), None)


def record(pid: int, seconds: int, out: Path, rate: int = 200) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into collapsed-stack text; the caller drives load meanwhile."""
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed: .venv/bin/pip install py-spy")
    return subprocess.Popen([exe, "record", "--format", "raw", "--rate", str(rate), "--duration", str(seconds),
                             "--pid", str(pid), "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _frame(text: str) -> str:
    """`handle (aegisd/gate/pipeline.py:77)` -> `handle (aegisd/gate/pipeline.py)`: merge a function's lines."""
    text = _LINE.sub(")", text.strip())
    return text.replace(str(Path(sys.prefix)) + "/lib/python3.11/site-packages/", "")


def summarise(collapsed: Path, top: int = 20) -> dict[str, Any]:
    """Top functions by own (leaf) samples and by inclusive samples, as percentages of all samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    pct = (lambda n: round(100 * n / total, 1)) if total else (lambda n: 0.0)
    # Frames that wrap the whole event loop (main, click, Runner.run) say nothing: leave them out.
    trunk = inclusive.get(_LOOP_FRAME, total + 1)
    return {"samples": total,
            "own": [(name, pct(n)) for name, n in own.most_common(top)],
            "inclusive": [(name, pct(n)) for name, n in inclusive.most_common() if n < trunk][:top]}
