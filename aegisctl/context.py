"""Per-invocation state shared by every command: where aegisd is, and the client."""

from __future__ import annotations

from pathlib import Path

import click

from aegisctl.client import AegisClient
from aegisctl.paths import PathError, resolve_socket


class Context:
    """Per-invocation state: where the daemon is, and the client, opened on first use."""

    def __init__(self, socket_flag: str | None, config: str | None) -> None:
        self._socket_flag = socket_flag
        self._config = config
        self._client: AegisClient | None = None

    @property
    def socket_path(self) -> Path:
        try:
            return resolve_socket(self._socket_flag, self._config)
        except PathError as exc:
            raise click.UsageError(str(exc)) from None

    @property
    def client(self) -> AegisClient:
        if self._client is None:
            self._client = AegisClient(self.socket_path)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


pass_context = click.make_pass_decorator(Context)
