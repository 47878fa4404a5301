"""Regenerate the Python stubs in aegisd/api from the protos in proto/.

protoc writes absolute imports (`from aegis.v1 import x_pb2`); the stubs live inside the
`aegisd.api` package, so those imports are rewritten to package-relative ones. (protoletariat
does this too, but pins protobuf below 6.) Run: `python proto/generate.py [--out DIR]`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
DEFAULT_OUT = ROOT / "aegisd" / "api"
_ABSOLUTE_IMPORT = re.compile(r"^(from|import) aegis\.v1( import|\.)", re.MULTILINE)


def generate(out: Path) -> list[Path]:
    """Write the stubs under `out`/aegis/v1 and return the files written."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / "aegis" / "v1").glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    grpc_include = Path(protoc.__file__).resolve().parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{grpc_include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    package = out / "aegis" / "v1"
    written = []
    for path in sorted(package.glob("*_pb2*.py*")):
        text = path.read_text()
        path.write_text(_ABSOLUTE_IMPORT.sub(_relative, text))
        written.append(path)
    for init in (out / "aegis" / "__init__.py", package / "__init__.py"):
        init.write_text('"""Generated from proto/aegis/v1 by proto/generate.py; do not edit."""\n')
        written.append(init)
    return written


def _relative(match: re.Match[str]) -> str:
    # "from aegis.v1 import x" -> "from . import x"; "import aegis.v1.x_pb2" is not emitted by protoc.
    return "from ." + (" import" if match.group(2) == " import" else ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ns = parser.parse_args()
    for path in generate(ns.out):
        print(path.relative_to(ns.out), file=sys.stderr)


if __name__ == "__main__":
    main()
