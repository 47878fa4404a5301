"""The control API stubs, generated from proto/aegis/v1: the only part of aegisd that aegisctl imports."""

from __future__ import annotations

import os
from urllib.parse import quote


def socket_target(path: str | os.PathLike[str]) -> str:
    """The gRPC target of the control socket at `path`. gRPC percent-decodes a `unix:` target and reads `?`, `#`
    and a leading `//` as URI syntax, so the path goes absolute and percent-encoded after an empty authority
    (`unix:///...`): the socket served and used is then the one checked."""
    return "unix://" + quote(os.path.abspath(os.fsencode(path)), safe="/")
