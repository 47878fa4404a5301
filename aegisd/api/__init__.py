"""The control API stubs, generated from proto/aegis/v1: the only part of aegisd that aegisctl imports."""

from __future__ import annotations

import os
from urllib.parse import quote


def socket_target(path: str | os.PathLike[str]) -> str:
    """The gRPC target aegisctl connects to for the control socket at `path`. A client's target is a URI: gRPC
    percent-decodes it and reads `?`, `#` and a leading `//` as URI syntax, so the path goes absolute and
    percent-encoded after an empty authority (`unix:///...`): the socket used is then the one checked."""
    return "unix://" + quote(os.path.abspath(os.fsencode(path)), safe="/")


def listen_target(path: str | os.PathLike[str]) -> str:
    """The gRPC address aegisd listens on for the control socket at `path`. A server's `unix:` address is only
    percent-decoded (an authority would be bound as part of the path, `///tmp/...`, and the socket's name would
    then not be `path`): percent-encoded, the socket bound is the one checked, and its name is `path`."""
    return "unix:" + quote(os.fsencode(path), safe="/")
