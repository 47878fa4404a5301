"""What an unlock key looks like: made by whoever asks for one (aegisctl), checked by the vault that takes it.

aegisctl makes the key and writes it to its file before it asks aegisd to use it, so an interrupted call
can never leave the vault opened by a key that exists nowhere. This module has no heavy imports: the CLI
loads it.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

from aegisd.errors import InvalidArgument

UNLOCK_KEY_PREFIX = "aegis-unlock-"
KEY_BYTES = 32
_SHAPE = re.compile(re.escape(UNLOCK_KEY_PREFIX) + r"[A-Za-z0-9_-]{43}\Z")


def new_unlock_key() -> str:
    """A random 256-bit unlock key, printable, with a prefix that says what it is."""
    return UNLOCK_KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")


def check_unlock_key(key: str) -> None:
    """Refuse anything new_unlock_key would not have made: a vault takes no weak or mistyped key."""
    try:
        whole = _SHAPE.match(key) is not None and len(base64.urlsafe_b64decode(key[len(UNLOCK_KEY_PREFIX):] + "=")) \
            == KEY_BYTES
    except (binascii.Error, ValueError):
        whole = False
    if not whole:
        raise InvalidArgument(f"an unlock key is {UNLOCK_KEY_PREFIX!r} and 43 base64url characters (256 random bits); "
                              "this one is not")
