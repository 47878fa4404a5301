"""The MCP bridge is an agent: it imports nothing from aegisd, not even the API stubs.

Checked twice: statically (every import in the bridge's files) and at run time (importing the
bridge, all of it, leaves no aegisd module loaded), so an indirect import is caught too.
"""

from __future__ import annotations

import subprocess
import sys

from tests.unit.test_api_contract import ROOT, imported_modules

BRIDGE_FILES = [*sorted((ROOT / "aegisctl" / "mcp").glob("*.py")), ROOT / "aegisctl" / "commands" / "mcp.py"]


def test_bridge_files_import_nothing_from_aegisd() -> None:
    assert len(BRIDGE_FILES) >= 8  # the scan really covers the bridge
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}" for path in BRIDGE_FILES
           for line, module in imported_modules(path) if module == "aegisd" or module.startswith("aegisd.")]
    assert bad == []


def test_importing_the_bridge_loads_no_aegisd_module() -> None:
    modules = [f"aegisctl.mcp.{path.stem}" for path in BRIDGE_FILES if path.parent.name == "mcp"
               and path.stem != "__init__"]
    code = (f"import sys, aegisctl.commands.mcp, {', '.join(modules)}\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aegisd'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
