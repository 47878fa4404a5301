"""Small helpers shared by the end-to-end tests: JSON reads through aegisctl, tmpfs mounts."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aegisd.store import VaultStore
from aegisd.vault.vault import Vault, open_sealed
from tests.harness import PASSPHRASE, Aegis, Result


def _json(aegis: Aegis, *args: str, in_process: bool = False) -> Any:
    """`aegisctl ARGS --json`'s answer: run as the program, or (in_process) in this process (Aegis.ctl_in_process),
    for the state checks around what a test is about, where a process started for each only costs CPU."""
    run = aegis.ctl_in_process if in_process else aegis.ctl
    return json.loads(run(*args, "--json").ok().out)


def status(aegis: Aegis) -> dict[str, Any]:
    value = _json(aegis, "status")
    assert isinstance(value, dict)
    return value


def show(aegis: Aegis, name: str) -> dict[str, Any]:
    value = _json(aegis, "vault", "show", name)
    assert isinstance(value, dict)
    return value


def names(aegis: Aegis) -> list[str]:
    listed = _json(aegis, "vault", "list")
    assert isinstance(listed, list)
    return [str(c["name"]) for c in listed]


def rpc_reason(error: grpc.RpcError) -> str:
    """A failed call's `aegis-reason` trailer (aegisd's stable reason code), or "" without one."""
    call: Any = error  # a grpc.Call too, which is what carries the trailers
    return next((str(v) for k, v in call.trailing_metadata() or () if k == "aegis-reason"), "")


def assert_failed(result: Result, *needles: str, code: int = 1) -> None:
    """The command failed with `code` and its stderr names every needle (case-insensitive)."""
    assert result.code == code, f"expected exit {code}, got {result.code}\n{result.out}\n{result.err}"
    assert "Traceback" not in result.err, result.err
    for needle in needles:
        assert needle.lower() in result.err.lower(), f"{needle!r} not in: {result.err}"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a small private tmpfs on `path` (skip when mounting is not permitted); always unmount."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "aegis-test", str(path)],
                             capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", "-o", f"remount,{options}", str(path)], capture_output=True, text=True,
                          check=False)


def open_secret(vault: Vault, credential_id: str) -> bytes:
    """One secret by credential id, opened the way update, rotate and remove open it: StorageCorrupt, with
    its message, when it fails."""
    assert vault.vault_id is not None
    with vault._store.reading() as conn:
        return open_sealed(conn, vault.vault_id, vault.master(), "id", credential_id)[1]


@contextlib.contextmanager
def open_vault(data_dir: Path, passphrase: str = PASSPHRASE) -> Iterator[Vault]:
    """Open a stopped daemon's vault with the daemon's own classes, to look at what is on disk."""
    path = data_dir / "vault.db"
    assert path.exists(), f"no vault database at {path}"
    store = VaultStore(path)
    store.open()
    try:
        vault = Vault(store)
        vault.unlock(passphrase=passphrase)
        try:
            yield vault
        finally:
            vault.lock()
    finally:
        store.close()


# The same reads run in this process; `status`, `show` and `names` above run the program.
def status_in_process(aegis: Aegis) -> dict[str, Any]:
    value = _json(aegis, "status", in_process=True)
    assert isinstance(value, dict)
    return value


def show_in_process(aegis: Aegis, name: str) -> dict[str, Any]:
    value = _json(aegis, "vault", "show", name, in_process=True)
    assert isinstance(value, dict)
    return value


def names_in_process(aegis: Aegis) -> list[str]:
    listed = _json(aegis, "vault", "list", in_process=True)
    assert isinstance(listed, list)
    return [str(c["name"]) for c in listed]


def policy_status_in_process(aegis: Aegis) -> dict[str, Any]:
    """`aegisctl policy list --json` (tests/e2e/policy_support.py's policy_status), run in this process."""
    value = _json(aegis, "policy", "list", in_process=True)
    assert isinstance(value, dict)
    return value
