"""Reading aegisd's TOML config file, bounded: one reader for aegisd and aegisctl (which imports only aegisd.api), so
both refuse the same files in the same words, and an endless file (`--config /dev/zero`) is one clear error."""

from __future__ import annotations

import os
import tomllib
from typing import Any

from aegisd.api.accounts import owner_problem

MAX_CONFIG_BYTES = 1 << 20


class ConfigFileError(Exception):
    """The config file cannot be read or parsed; the message names it and says why."""


def read_config_file(path: str | os.PathLike[str], *, owned: bool = False) -> dict[str, Any]:
    """The file's TOML as a dict, read as at most MAX_CONFIG_BYTES. `owned` (aegisd's own config): refused if it
    belongs to another user than the reader's or root, or group or others may write it, judged on the file opened:
    whoever can change it could move the policy directory, open the gate to the network, or turn off its checks."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
            if len(data) > MAX_CONFIG_BYTES:
                raise ConfigFileError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 1024} KiB, far more "
                                      "than any aegisd config; is it the right file?")
            problem = owner_problem(os.fstat(fh.fileno())) if owned else None
            if problem is not None:
                raise ConfigFileError(f"config file {path} {problem}: whoever can change it could change how aegisd "
                                      "runs (its policy directory, the gate's address); make it aegisd's user's or "
                                      "root's and chmod go-w it")
        return tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigFileError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigFileError(f"config file {path} is not UTF-8 text, which TOML must be") from None
    except OSError as exc:
        raise ConfigFileError(f"config file {path} cannot be read: {exc.strerror}") from None
    except (ValueError, RecursionError):  # an integer past Python's 4,300 digits; arrays nested past its stack
        raise ConfigFileError(f"config file {path} is not TOML aegisd can read: a number too long or values nested "
                              "too deeply") from None
