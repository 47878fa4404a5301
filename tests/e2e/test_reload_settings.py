"""SIGHUP: every setting it cannot apply to the running daemon is named in the log, as the config file
spells it; none is silently ignored."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from aegisd.config import SETTING_KEYS, setting_name
from tests.e2e.support import status
from tests.harness import Aegis, free_port

# What a SIGHUP applies live; everything else needs a restart.
APPLIED_LIVE = {"log_level", "policies_dir"}
RESTART_WARNING = "restart aegisd to apply"


def toml(values: dict[str, object]) -> str:
    """A config file from {setting key: value}, each key in its section."""
    sections: dict[str, list[str]] = {}
    for key, value in values.items():
        name = setting_name(key)
        section, _, option = name.rpartition(" ")
        text = ("true" if value else "false") if isinstance(value, bool) else (
            repr(value) if isinstance(value, int | float) else f'"{value}"')
        sections.setdefault(section.strip("[]"), []).append(f"{option} = {text}")
    lines = [*sections.pop("", [])]
    for section, options in sections.items():
        lines += [f"[{section}]", *options]
    return "\n".join(lines) + "\n"


def wait_for_count(aegis: Aegis, needle: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while aegis.log().count(needle) < count:
        assert time.monotonic() < deadline, aegis.log()
        time.sleep(0.05)


def test_sighup_names_every_setting_it_cannot_apply(fresh: Aegis) -> None:
    root = fresh.root
    for name in ("p1", "p2"):
        (root / name).mkdir(mode=0o700)
    fresh.gate_port = port = free_port()
    # (value at start, value after the edit) for every setting the file knows.
    settings: dict[str, tuple[object, object]] = {
        "data_dir": (str(fresh.data_dir), str(root / "data2")),
        "socket": (str(fresh.socket), str(root / "run2" / "aegisd.sock")),
        "socket_group": ("", "users"),
        "socket_mode": ("0600", "0640"),
        "unlock_key_file": ("", str(root / "unlock.key")),
        "stop_grace": (10, 11),
        "gate_listen": (f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"),
        "gate_allow_non_loopback": (False, True),
        "connect_timeout": (10, 11),
        "read_timeout": (120, 121),
        "total_timeout": (600, 601),
        "max_body_bytes": (1 << 20, 2 << 20),
        "agent_max_concurrency": (64, 65),
        "max_connections": (1024, 1025),
        "metrics_enabled": (True, False),
        "health_enabled": (True, False),
        "webhook_queue_size": (1000, 1001),
        "webhook_workers": (4, 5),
        "webhook_timeout": (10, 11),
        "webhook_max_attempts": (5, 6),
        "webhook_retry_delay": (1, 2),
        "policies_dir": (str(root / "p1"), str(root / "p2")),
        "log_format": ("human", "json"),
        "log_level": ("info", "debug"),
        "kdf_memory_mib": (19, 20),
        "kdf_iterations": (2, 3),
    }
    fresh.env.update({"AEGIS_KDF_MEMORY_MIB": "", "AEGIS_KDF_ITERATIONS": ""})  # the harness's would win over the file
    assert set(settings) == set(SETTING_KEYS), "a setting was added: give it a before and an after here"
    before = {key: old for key, (old, _) in settings.items() if old != ""}
    after = {key: new for key, (_, new) in settings.items()}
    config = root / "aegisd.toml"
    config.write_text(toml(before))
    # The harness names the data directory, socket and gate in the environment, which outranks the file.
    fresh.start("--config", str(config), env={"AEGIS_DATA_DIR": "", "AEGIS_SOCKET": "", "AEGIS_GATE_LISTEN": ""})
    assert fresh.proc is not None

    config.write_text(toml(after))
    fresh.proc.send_signal(signal.SIGHUP)
    wait_for_count(fresh, "configuration reloaded", 1)
    warnings = [line for line in fresh.log().splitlines() if RESTART_WARNING in line]
    assert len(warnings) == 1, fresh.log()
    named = warnings[0].split("reload: ", 1)[1].split(" changed;", 1)[0].split(", ")
    expected = [setting_name(key) for key in SETTING_KEYS if key not in APPLIED_LIVE]
    assert sorted(named) == sorted(expected), warnings[0]
    assert "[gate] max_body_bytes" in named and "[log] format" in named  # the file's spelling, not the field's
    assert status(fresh)["state"] == "uninitialized"  # still serving on the socket it started with

    # Back to the running settings (the live ones aside): nothing is reported any more.
    config.write_text(toml({**before, "log_level": "debug", "policies_dir": str(root / "p2")}))
    fresh.proc.send_signal(signal.SIGHUP)
    wait_for_count(fresh, "configuration reloaded", 2)
    assert fresh.log().count(RESTART_WARNING) == 1, fresh.log()
    assert fresh.stop() == 0
    assert not Path(root / "run2").exists() and not Path(root / "data2").exists()


def test_a_config_file_another_user_could_change_is_not_taken(fresh: Aegis) -> None:
    """Found by an audit of SECURITY.md (alongside the policy files): the config file can move the policy
    directory, open the gate to the network or turn its checks off, yet anyone who could write it was trusted.
    Writable by group or others, it is refused at start, and at a SIGHUP the running settings stay."""
    config = fresh.root / "aegisd.toml"
    config.write_text('[log]\nlevel = "info"\n')
    config.chmod(0o666)
    fresh.start("--config", str(config), wait=False)
    assert fresh.proc is not None and fresh.proc.wait(15) == 2
    fresh.kill()  # forget the process that refused
    assert f"config file {config} is writable by group or others (mode 0666)" in fresh.log(), fresh.log()

    config.chmod(0o644)
    fresh.start("--config", str(config))
    config.write_text('[log]\nlevel = "debug"\n')
    config.chmod(0o646)
    assert fresh.proc is not None
    fresh.proc.send_signal(signal.SIGHUP)
    wait_for_count(fresh, "reload failed, keeping the running settings", 1)
    assert "writable by group or others (mode 0646)" in fresh.log()
    assert fresh.stop() == 0
