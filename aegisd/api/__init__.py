"""The control API stubs, generated from proto/aegis/v1: the only part of aegisd that aegisctl imports."""

from __future__ import annotations

import os
from urllib.parse import quote


def socket_target(path: str | os.PathLike[str]) -> str:
    """The gRPC target of the control socket at `path`. gRPC percent-decodes a `unix:` target and reads `?` and
    `#` as URI syntax, so the path is percent-encoded: the socket served and used is then the one checked."""
    return "unix:" + quote(os.fsencode(path), safe="/")
