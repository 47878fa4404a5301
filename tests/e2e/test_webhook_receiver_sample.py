"""The receiver sample in docs/operations.md, run as written against a real delivery (from a cold review).

Operators copy it, so it must accept aegisd's own deliveries and reject every forgery cleanly: its str comparison
raised TypeError for a forged X-Aegis-Signature holding a non-ASCII character (hmac.compare_digest takes only ASCII
str), and web frameworks hand header values over as str decoded from Latin-1, so any byte past 0x7f does that. The
signing secret is checked never to leak (assert_no_leaks).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.ops_support import add_webhook, ops_world
from tests.webhook_receiver import Receiver

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
Verify = Callable[[bytes, dict[str, str]], dict[str, Any]]


def _sample(secret: str) -> Verify:
    """The documented `verify`, its placeholder secret replaced with the webhook's, and nothing else changed."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    source = next(block for block in blocks if "def verify(" in block)
    assert 'SECRET = b"whsec_..."' in source, source
    namespace: dict[str, Any] = {}
    exec(source.replace('b"whsec_..."', repr(secret.encode())), namespace)  # noqa: S102 - our own docs' sample
    verify: Verify = namespace["verify"]
    return verify


def test_the_documented_receiver_accepts_a_delivery_and_rejects_every_forgery_cleanly() -> None:
    """A real `webhook test` delivery passes the sample; the same delivery with its signature forged (wrong hex,
    missing, a Latin-1 byte as a framework decodes it, a lone surrogate as a surrogateescape decoding leaves it)
    or its body changed is rejected with PermissionError, never another exception."""
    world = ops_world()
    receiver = Receiver().start()
    try:
        hook = add_webhook(world, receiver, "blocked_request")
        world.aegis.ctl_in_process("webhook", "test", hook).ok()
        delivery = receiver.wait_for(1, "test")[0]
        assert delivery.verified, delivery
        verify = _sample(receiver.secret)
        assert verify(delivery.body, delivery.headers)["id"] == delivery.delivery_id

        genuine = delivery.headers["X-Aegis-Signature"]
        forged_values = ["sha256=" + "0" * 64, "", genuine[:-1] + "\u00e9", b"sha256=\xe9\xff".decode("latin-1"),
                         genuine[:-1] + "\udce9"]
        for forged in forged_values:
            with pytest.raises(PermissionError):
                verify(delivery.body, {**delivery.headers, "X-Aegis-Signature": forged})
        with pytest.raises(PermissionError):
            verify(delivery.body, {k: v for k, v in delivery.headers.items() if k != "X-Aegis-Signature"})
        with pytest.raises(PermissionError):
            verify(delivery.body + b" ", delivery.headers)
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()
