"""The control API as a contract: aegisctl imports only the stubs, the stubs match the protos,
and no response message has a field that could carry a secret."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import Descriptor, FieldDescriptor

ROOT = Path(__file__).resolve().parents[2]
API_DIR = ROOT / "aegisd" / "api"
PROTO_DIR = ROOT / "proto" / "aegis" / "v1"

# Response fields that may hold something shown once at creation, by design.
SHOWN_ONCE = {("aegis.v1.InitResponse", "unlock_key"), ("aegis.v1.AddWebhookResponse", "secret")}
FORBIDDEN_FIELDS = {"secret", "passphrase", "master_key", "master", "key_slot", "key_slots_raw", "wrapped",
                    "salt", "ciphertext", "nonce", "token_hash", "kek"}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name a file imports, with its line, including importlib/__import__ calls."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def boundary_violations(package: Path) -> list[str]:
    bad = []
    for path in sorted(package.rglob("*.py")):
        for line, module in imported_modules(path):
            if (module == "aegisd" or module.startswith("aegisd.")) and not module.startswith("aegisd.api."):
                bad.append(f"{path.relative_to(package.parent)}:{line} imports {module}")
    return bad


def test_aegisctl_imports_only_the_api_stubs_from_aegisd() -> None:
    files = list((ROOT / "aegisctl").rglob("*.py"))
    assert len(files) > 5  # the scan really covers the package
    assert boundary_violations(ROOT / "aegisctl") == []


def test_boundary_check_catches_violations(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "ok.py").write_text("from aegisd.api.aegis.v1 import vault_pb2\nimport click\nfrom . import x\n")
    (package / "bad1.py").write_text("from aegisd.vault import crypto\n")
    (package / "bad2.py").write_text("def f():\n    import aegisd.store\n")
    (package / "bad3.py").write_text("import importlib\nimportlib.import_module('aegisd.daemon')\n")
    (package / "bad4.py").write_text("from aegisd import errors\n")
    bad = boundary_violations(package)
    assert len(bad) == 4, bad
    assert not any("ok.py" in b for b in bad)


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    protos = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
    assert protos, "no protos found"
    for stem in protos:
        assert Path("aegis", "v1", f"{stem}_pb2.py") in generated
    stale = [str(rel) for rel in generated
             if not (API_DIR / rel).exists() or (API_DIR / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert stale == [], f"stale stubs, run `make proto`: {stale}"
    # No stub left behind for a proto that no longer exists.
    committed = sorted(p.relative_to(API_DIR) for p in (API_DIR / "aegis" / "v1").glob("*_pb2*"))
    assert [str(p) for p in committed if p not in generated] == []


def response_fields(message: Descriptor, seen: set[str] | None = None) -> list[tuple[str, str]]:
    seen = set() if seen is None else seen
    if message.full_name in seen:
        return []
    seen.add(message.full_name)
    fields: list[tuple[str, str]] = []
    for field in message.fields:
        fields.append((message.full_name, field.name))
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None:
            fields.extend(response_fields(field.message_type, seen))
    return fields


def test_no_response_has_a_field_for_key_material() -> None:
    checked = 0
    offending = []
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        module = importlib.import_module(f"aegisd.api.aegis.v1.{proto.stem}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                for owner, name in response_fields(method.output_type):
                    checked += 1
                    if (owner, name) in SHOWN_ONCE:
                        continue
                    if name in FORBIDDEN_FIELDS or name.endswith(("_secret", "_hash", "_passphrase")):
                        offending.append(f"{service.name}.{method.name} -> {owner}.{name}")
    assert checked > 20
    assert offending == []
