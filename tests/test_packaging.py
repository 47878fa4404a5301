"""Service packaging: the systemd unit, its sysusers fragment and the launchd plist.

Checks that the unit keeps its must-have directives and its measured hardening
(`systemd-analyze security` exposure at most 2.0), that the plist agrees with the
unit, and that the daemon's native stack really runs under MemoryDenyWriteExecute=
(emulated with the same seccomp rules systemd installs).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import plistlib
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aegisd.cli import command as aegisd_command
from aegisd.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO_ROOT / "packaging" / "systemd"
UNIT = SYSTEMD_DIR / "aegisd.service"
SYSUSERS = SYSTEMD_DIR / "aegisd.sysusers"
PLIST = REPO_ROOT / "packaging" / "launchd" / "dev.aegis.aegisd.plist"
README = REPO_ROOT / "packaging" / "README.md"
# The shipped /etc/aegis/aegisd.toml: the packaged service's settings live there, not in the unit.
CONFIG = SYSTEMD_DIR / "aegisd.toml"
INSTALLED_CONFIG = "/etc/aegis/aegisd.toml"
CONFIGURATION_DOC = REPO_ROOT / "docs" / "configuration.md"

MAX_EXPOSURE = 2.0
BINARY = "/usr/local/bin/aegisd"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Parse a systemd unit file, keeping every assignment of repeated keys in order.

    An empty assignment (`Key=`) resets the list, as systemd does for list-valued settings.
    """
    sections: Unit = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        key, value = key.strip(), value.strip()
        if value:
            current.setdefault(key, []).append(value)
        else:
            current[key] = []
    return sections


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT)


@pytest.fixture(scope="module")
def service(unit: Unit) -> dict[str, list[str]]:
    return unit["Service"]


def one(service: dict[str, list[str]], key: str) -> str:
    values = service.get(key, [])
    assert values, f"{key}= missing from {UNIT.name}"
    return values[-1]


def unit_environment(service: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for word in shlex.split(line):
            name, _, value = word.partition("=")
            env[name] = value
    return env


def exec_start_args(service: dict[str, list[str]]) -> list[str]:
    return shlex.split(one(service, "ExecStart"))[1:]


def service_config(service: dict[str, list[str]]) -> Config:
    """The settings aegisd resolves under the unit: its ExecStart flags and Environment=, the directories
    systemd hands it, and the shipped config file in place of the one AEGIS_CONFIG names."""
    env = unit_environment(service)
    assert env.get("AEGIS_CONFIG") == INSTALLED_CONFIG
    env.update({"AEGIS_CONFIG": str(CONFIG), "STATE_DIRECTORY": "/var/lib/aegis", "RUNTIME_DIRECTORY": "/run/aegis"})
    flags = aegisd_command.make_context("aegisd", exec_start_args(service)).params
    return load_config(flags, env)


def documented_overrides() -> tuple[set[str], set[str]]:
    """The flags and environment variables docs/configuration.md lists for settings the config file also
    controls: any of them in the unit would silently override what the docs tell an operator to edit."""
    flags: set[str] = set()
    names: set[str] = set()
    for line in CONFIGURATION_DOC.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[3] or cells[3] == "config file" or set(cells[3]) <= {"-", " "}:
            continue
        flags.update(cell for cell in cells[1].split() if cell.startswith("--"))
        names.update(cell for cell in cells[2].split() if cell.startswith("AEGIS_"))
    return flags, names


def sysusers_groups() -> set[str]:
    groups: set[str] = set()
    for raw in SYSUSERS.read_text(encoding="utf-8").splitlines():
        fields = raw.split()
        if fields and fields[0] in {"g", "u"}:
            groups.add(fields[1])
    return groups


def load_plist() -> dict[str, Any]:
    with PLIST.open("rb") as fh:
        data = plistlib.load(fh)
    assert isinstance(data, dict)
    return data


# --- systemd-analyze -----------------------------------------------------------------------------


def test_security_exposure_within_budget() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline mode: {proc.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, f"no exposure line in output:\n{proc.stdout}\n{proc.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{proc.stdout}"


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` on a copy whose ExecStart points at a binary that exists here.

    aegisd itself is not installed in the test environment; everything else (directive
    names, values, dependencies) is checked for real. Unknown keys only warn, so stderr
    must not mention the unit at all.
    """
    analyze = shutil.which("systemd-analyze")
    true = shutil.which("true")
    if analyze is None or true is None:
        pytest.skip("systemd-analyze (or true) is not installed")
    text = UNIT.read_text(encoding="utf-8")
    assert f"ExecStart={BINARY}" in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(f"ExecStart={BINARY}", f"ExecStart={true}"), encoding="utf-8")
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert UNIT.name not in proc.stderr, proc.stderr


def test_sysusers_fragment_parses(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    proc = subprocess.run(
        [sysusers, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Creating group 'aegis'" in proc.stdout + proc.stderr


# --- the unit's must-haves -----------------------------------------------------------------------


def test_unit_lifecycle(service: dict[str, list[str]]) -> None:
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "WatchdogSec") == "30s"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "KillSignal") == "SIGTERM"
    assert one(service, "TimeoutStopSec") == "30s"
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "LimitCORE") == "0"
    assert one(service, "MemorySwapMax") == "0"  # the vault key and opened secrets never reach swap
    exec_start = shlex.split(one(service, "ExecStart"))
    assert exec_start[0] == BINARY


def test_unit_identity_and_directories(service: dict[str, list[str]]) -> None:
    assert one(service, "DynamicUser") == "yes"
    assert "User" not in service, "DynamicUser= derives the user name from the unit"
    assert one(service, "StateDirectory") == "aegis"
    assert one(service, "StateDirectoryMode") == "0700"
    assert one(service, "RuntimeDirectory") == "aegis"
    assert one(service, "UMask") == "0077"
    assert "aegis-unlock" in service.get("LoadCredentialEncrypted", [])


def test_socket_sharing_is_consistent(service: dict[str, list[str]]) -> None:
    """A group-shared socket needs all its pieces (the shipped config's group, the unit's Group=, the
    sysusers group, a directory the group may traverse, chown); a private one needs none of them."""
    config = service_config(service)
    mode = int(one(service, "RuntimeDirectoryMode"), 8)
    assert not mode & 0o007, "others must not reach the socket directory"
    if config.socket_group:
        group = one(service, "Group")
        assert config.socket_group == group
        assert config.socket_mode == 0o660
        assert mode & 0o010, "the socket group must be able to traverse /run/aegis"
        assert group in sysusers_groups(), f"{SYSUSERS.name} must create group {group!r}"
        assert "@chown" in service.get("SystemCallFilter", []), "aegisd chgrps its socket"
    else:
        assert config.socket_mode == 0o600
    # Where aegisctl looks for the packaged daemon (docs/configuration.md, README.md).
    assert config.socket_path == Path("/run/aegis/aegisd.sock")


def test_unit_environment(service: dict[str, list[str]]) -> None:
    env = unit_environment(service)
    assert env["AEGIS_CONFIG"] == INSTALLED_CONFIG
    assert [name for name in env if name.startswith("AEGIS_") and name != "AEGIS_CONFIG"] == []


def test_unit_sets_no_setting_the_config_file_controls(service: dict[str, list[str]]) -> None:
    """Flags and environment beat the config file: were the unit to set one, an operator editing
    /etc/aegis/aegisd.toml as docs/configuration.md shows would see no effect (and no log line)."""
    flags, names = documented_overrides()
    assert {"--gate-listen", "--socket-group", "--socket-mode", "--socket"} <= flags  # the table was read
    assert {"AEGIS_GATE_LISTEN", "AEGIS_SOCKET_GROUP", "AEGIS_SOCKET_MODE", "AEGIS_SOCKET"} <= names
    env = unit_environment(service)
    args = exec_start_args(service)
    overriding = sorted(name for name in names if name in env)
    overriding += [arg for arg in args if arg.split("=", 1)[0] in flags]
    assert overriding == [], f"{UNIT.name} overrides {INSTALLED_CONFIG} with {overriding}"


def test_shipped_config_gives_the_service_its_settings(service: dict[str, list[str]]) -> None:
    config = service_config(service)
    assert config.gate_address == "127.0.0.1:3100"
    assert config.socket_group == one(service, "Group")
    assert config.socket_mode == 0o660
    assert config.data_dir == Path("/var/lib/aegis")
    assert config.socket_path == Path("/run/aegis/aegisd.sock")
    # Every setting that is not a default comes from the file: nothing in the unit overrides it.
    assert config.sources and set(config.sources.values()) == {str(CONFIG)}, config.sources
    readme = README.read_text(encoding="utf-8")
    assert f"install -m 0644 packaging/systemd/{CONFIG.name} {INSTALLED_CONFIG}" in readme


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("PrivateUsers", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectControlGroups", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectHostname", "yes"),
        ("ProtectProc", "invisible"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
    ],
)
def test_unit_hardening(service: dict[str, list[str]], key: str, expected: str) -> None:
    assert one(service, key) == expected


def test_unit_capabilities_and_families(service: dict[str, list[str]]) -> None:
    assert service.get("CapabilityBoundingSet", ["<unset>"]) == [], "no capabilities at all"
    assert service.get("AmbientCapabilities", ["<unset>"]) == []
    families = set(one(service, "RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert "@system-service" in service.get("SystemCallFilter", [])


# --- launchd ---------------------------------------------------------------------------------------


def test_plist_runs_aegisd_and_stays_up() -> None:
    plist = load_plist()
    assert plist["Label"] == PLIST.stem
    assert plist["ProgramArguments"][0].endswith("/aegisd")
    assert plist["RunAtLoad"] is True
    keep_alive = plist["KeepAlive"]
    assert keep_alive is True or (
        isinstance(keep_alive, dict)
        and (keep_alive.get("SuccessfulExit") is False or keep_alive.get("Crashed") is True)
    ), f"KeepAlive does not restart a crashed daemon: {keep_alive!r}"
    assert plist["ProcessType"] in {"Interactive", "Background"}
    assert plist["ExitTimeOut"] >= 30
    assert plist["Umask"] == 0o077
    assert plist["HardResourceLimits"]["Core"] == 0


def test_plist_sets_no_environment_and_its_defaults_match_the_unit(service: dict[str, list[str]]) -> None:
    """A variable in the plist would outrank a config file the user adds (found by a cold review: its
    AEGIS_GATE_LISTEN hid `[gate] listen`); aegisd's own default gate address is the unit's."""
    assert "EnvironmentVariables" not in load_plist()
    assert load_config({}, {"HOME": "/nonexistent"}).gate_address == service_config(service).gate_address


def test_plist_log_paths_use_documented_placeholder() -> None:
    plist = load_plist()
    readme = README.read_text(encoding="utf-8")
    for key in ("StandardOutPath", "StandardErrorPath"):
        path = plist[key]
        assert path.startswith("__HOME__/Library/Logs/aegis/"), path
        assert "~" not in path
    assert "s#__HOME__#$HOME#g" in readme, "README must show how to substitute __HOME__"


def test_readme_references_the_unlock_key_flow() -> None:
    readme = README.read_text(encoding="utf-8")
    for needle in (
        "aegisctl init --unlock-key-out",
        "systemd-creds encrypt",
        "/etc/credstore.encrypted/aegis-unlock",
        "systemctl daemon-reload && sudo systemctl enable --now aegisd",
        "AEGIS_SOCKET=/run/aegis/aegisd.sock",
        "launchctl bootstrap gui/",
        # Type=notify needs systemd-python: the README installs aegisd with the extra, where the unit runs it.
        '/opt/aegis/bin/pip install ".[systemd]"',
        f"ln -sf /opt/aegis/bin/aegisd /opt/aegis/bin/aegisctl {Path(BINARY).parent}/",
    ):
        assert needle in readme, needle


# --- MemoryDenyWriteExecute=yes, emulated --------------------------------------------------------

# seccomp_data offsets: nr (u32), arch (u32), ip (u64), args[6] (u64, little-endian low word first).
_ARCHES: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {"mmap": 9, "mprotect": 10, "pkey_mprotect": 329, "shmat": 30, "socket": 41}),
    "aarch64": (
        0xC00000B7,
        {"mmap": 222, "mprotect": 226, "pkey_mprotect": 288, "shmat": 196, "socket": 198},
    ),
}
_LD_W_ABS, _JEQ_K, _JSET_K, _AND_K, _RET_K = 0x20, 0x15, 0x45, 0x54, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_PROT_WRITE, _PROT_EXEC, _SHM_EXEC = 0x2, 0x4, 0o100000
_ALLOWED_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
MDWE_CHILD_SKIP = 77

Insn = tuple[int, int, str | None, str | None]


def _arg(n: int) -> int:
    return 16 + 8 * n


def _assemble(program: list[Insn | str]) -> bytes:
    """Resolve label names (plain strings in `program`) into classic-BPF jump offsets.

    Classic BPF only jumps forward, by at most 255 instructions; a `None` target falls through.
    """
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in program:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = b""
    for index, (code, k, true_label, false_label) in enumerate(insns):
        jt = labels[true_label] - index - 1 if true_label else 0
        jf = labels[false_label] - index - 1 if false_label else 0
        assert 0 <= jt < 256 and 0 <= jf < 256
        out += struct.pack("=HBBI", code, jt, jf, k)
    return out


def mdwe_filter(machine: str) -> tuple[bytes, int]:
    """The rules systemd installs for MemoryDenyWriteExecute= and RestrictAddressFamilies=.

    mmap() with PROT_WRITE|PROT_EXEC, mprotect()/pkey_mprotect() with PROT_EXEC and shmat()
    with SHM_EXEC fail with EPERM; socket() outside AF_UNIX/AF_INET/AF_INET6 fails with
    EAFNOSUPPORT. Returns the packed program and its length in instructions.
    """
    arch, nr = _ARCHES[machine]
    program: list[Insn | str] = [
        (_LD_W_ABS, 4, None, None),
        (_JEQ_K, arch, "dispatch", "allow"),
        "dispatch",
        (_LD_W_ABS, 0, None, None),
        (_JEQ_K, nr["mmap"], "mmap", None),
        (_JEQ_K, nr["mprotect"], "mprotect", None),
        (_JEQ_K, nr["pkey_mprotect"], "mprotect", None),
        (_JEQ_K, nr["shmat"], "shmat", None),
        (_JEQ_K, nr["socket"], "socket", "allow"),
        "mmap",
        (_LD_W_ABS, _arg(2), None, None),
        (_AND_K, _PROT_WRITE | _PROT_EXEC, None, None),
        (_JEQ_K, _PROT_WRITE | _PROT_EXEC, "eperm", "allow"),
        "mprotect",
        (_LD_W_ABS, _arg(2), None, None),
        (_JSET_K, _PROT_EXEC, "eperm", "allow"),
        "shmat",
        (_LD_W_ABS, _arg(2), None, None),
        (_JSET_K, _SHM_EXEC, "eperm", "allow"),
        "socket",
        (_LD_W_ABS, _arg(0), None, None),
        *[(_JEQ_K, family, "allow", None) for family in _ALLOWED_FAMILIES],
        (_RET_K, _RET_ERRNO | errno.EAFNOSUPPORT, None, None),
        "eperm",
        (_RET_K, _RET_ERRNO | errno.EPERM, None, None),
        "allow",
        (_RET_K, _RET_ALLOW, None, None),
    ]
    code = _assemble(program)
    return code, len(code) // 8


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_filter() -> None:
    code, length = mdwe_filter(platform.machine())
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(length, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    pr_set_no_new_privs, pr_set_seccomp, seccomp_mode_filter = 38, 22, 2
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0 or (
        libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.addressof(prog), 0, 0) != 0
    ):
        print(f"seccomp unavailable: {os.strerror(ctypes.get_errno())}")
        sys.exit(MDWE_CHILD_SKIP)


def _mdwe_child() -> None:
    """Runs in a subprocess: filter first, then everything aegisd's process does natively."""
    import mmap
    import socket
    import sqlite3
    import ssl
    import tempfile

    _install_filter()

    # The filter is live: W+X memory and netlink sockets are refused.
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        pass
    else:
        raise AssertionError("filter not active: W+X mapping allowed")
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
    except OSError as exc:
        assert exc.errno == errno.EAFNOSUPPORT
    else:
        raise AssertionError("filter not active: AF_NETLINK allowed")
    print("filter active")

    # libffi closures (a ctypes callback): served from static trampolines, no W+X needed.
    libc = ctypes.CDLL(None)
    cmp_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    values = (ctypes.c_int * 4)(3, 1, 4, 2)
    libc.qsort(values, 4, ctypes.sizeof(ctypes.c_int), cmp_type(lambda a, b: a[0] - b[0]))
    assert list(values) == [1, 2, 3, 4]
    print("ctypes callback ok")

    # getaddrinfo(AI_ADDRCONFIG) without netlink falls back instead of failing.
    assert socket.getaddrinfo("localhost", 443, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)
    print("resolver ok")

    import asyncio
    import datetime
    from concurrent import futures

    import aiohttp
    import grpc
    import uvloop
    from aiohttp import web
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    from cryptography.x509.oid import NameOID
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, b"payload", b"ad")
    assert AESGCM(key).decrypt(nonce, sealed, b"ad") == b"payload"
    kek = Argon2id(salt=os.urandom(16), length=32, iterations=1, lanes=2, memory_cost=16 * 1024)
    assert len(kek.derive(b"passphrase")) == 32
    print("cryptography ok")

    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "vault.db")
        assert db.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (1)")
        db.commit()
        db.close()
        print("sqlite ok")

        # OpenSSL end to end: system CA store, then a TLS handshake over loopback.
        ssl.create_default_context()
        private = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(private, hashes.SHA256())
        )
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert_path, key_path)
        client_ctx = ssl.create_default_context(cafile=str(cert_path))

        async def handler(request: web.Request) -> web.Response:
            return web.Response(text="pong")

        async def https_round_trip() -> str:
            app = web.Application()
            app.router.add_get("/ping", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
            await site.start()
            port = runner.addresses[0][1]
            try:
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"https://localhost:{port}/ping", ssl=client_ctx) as resp,
                ):
                    return await resp.text()
            finally:
                await runner.cleanup()

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(https_round_trip()) == "pong"
        print("uvloop + aiohttp + TLS ok")

        # gRPC over a unix socket, like the control API.
        address = f"unix:{tmp}/aegisd.sock"
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        server.add_insecure_port(address)
        server.start()
        try:
            with grpc.insecure_channel(address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            server.stop(None)
        print("grpc ok")

    # The gate's parsers and matcher: llhttp, and a Hyperscan compile and scan.
    import httptools
    import hyperscan

    urls: list[bytes] = []
    httptools.HttpRequestParser(type("Callbacks", (), {"on_url": lambda self, url: urls.append(url)})()).feed_data(
        b"GET /svc/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert urls == [b"/svc/x"]
    database = hyperscan.Database()
    database.compile(expressions=[b"sk-", b"ghp_"], ids=[0, 1], literal=True)
    hits: list[int] = []
    database.scan(b"a sk-1 b ghp_2", lambda ident, start, end, flags, context: hits.append(ident))
    assert sorted(hits) == [0, 1]
    print("httptools + hyperscan ok")

    # The passphrase check's child process starts, hardens itself and answers under the same rules.
    from aegisd.vault.passphrase_strength import check_passphrase_strength

    check_passphrase_strength("vivid walrus ironing ochre tundra")
    print("passphrase strength child ok")
    print("MDWE-OK")


def test_native_stack_runs_under_memory_deny_write_execute() -> None:
    """MemoryDenyWriteExecute=yes stays only because this passes (see the unit's comment)."""
    if sys.platform != "linux" or platform.machine() not in _ARCHES:
        pytest.skip(f"seccomp emulation covers Linux on {sorted(_ARCHES)} only")
    for module in ("aiohttp", "grpc", "grpc_health", "uvloop", "cryptography", "httptools", "hyperscan"):
        pytest.importorskip(module)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--mdwe-child"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode == MDWE_CHILD_SKIP:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MDWE-OK" in proc.stdout, proc.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--mdwe-child"]:
    _mdwe_child()
