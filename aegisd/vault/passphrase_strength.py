"""How guessable a new passphrase is, judged by zxcvbn in a short-lived child process.

zxcvbn's dictionaries take ~13 MiB, and even freed they leave ~3 MiB of part-used allocator arenas
behind: a long-running daemon would carry that for its whole life for a check only `init` makes. The
child marks itself non-dumpable (aegisd.hardening) before it reads the passphrase from its stdin, so
while it holds the passphrase it is as closed to same-user debuggers and core dumps as the daemon. It
runs isolated (`-E -P`, in "/"): a module planted in aegisd's working directory or named by a PYTHON*
variable would otherwise be imported in the process that holds the passphrase.
"""

from __future__ import annotations

import json
import logging
import site
import subprocess
import sys

from aegisd.errors import AegisError, InvalidArgument

MIN_PASSPHRASE_LENGTH = 12
MIN_PASSPHRASE_SCORE = 3  # zxcvbn: "safely unguessable"
_CHECK_SECONDS = 30.0
# zxcvbn 4.5 refuses longer input outright (and 4.4 slows down past it); a passphrase whose first 72 characters
# are unguessable is, so only those are judged, and longer ones (a long diceware line) can still be set.
_JUDGED_CHARACTERS = 72
log = logging.getLogger("aegisd.vault")


def check_passphrase_strength(passphrase: str) -> None:
    """Refuse passphrases an offline attacker would guess; say how to pick a better one."""
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise InvalidArgument(f"the passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters; "
                              "four or more unrelated words work well")
    score, warning = _zxcvbn_verdict(passphrase[:_JUDGED_CHARACTERS])
    if score < MIN_PASSPHRASE_SCORE:
        hint = warning or "it is too easy to guess"
        raise InvalidArgument(f"the passphrase is too weak ({hint.rstrip('.')}); "
                              "use four or more unrelated words or a password manager")


def _child_argv() -> list[str]:
    """The child's command: `-P` keeps the working directory off its sys.path and `-E` ignores PYTHONPATH and
    the other PYTHON* variables; the user's site-packages load only if the daemon's do (`-s` otherwise: -I in
    all), so an aegisd installed with `pip --user` still finds itself. The venv's site-packages always load."""
    user_site = getattr(site, "ENABLE_USER_SITE", False) is True
    return [sys.executable, "-E", "-P", *([] if user_site else ["-s"]), "-m", __name__]


def _zxcvbn_verdict(passphrase: str) -> tuple[int, str]:
    """zxcvbn's score (0-4) and warning, from the child (`main` below)."""
    verdict: object = None
    try:
        child = subprocess.run(_child_argv(), input=passphrase.encode("utf-8", "surrogatepass"), cwd="/",
                               capture_output=True, timeout=_CHECK_SECONDS, check=False)
        if child.returncode == 0:
            verdict = json.loads(child.stdout)
        else:  # its stderr is not logged: a traceback there could quote the passphrase
            log.error("the passphrase strength check exited %s", child.returncode)
    except subprocess.TimeoutExpired:
        log.error("the passphrase strength check took longer than %gs", _CHECK_SECONDS)
    except OSError as exc:
        log.error("the passphrase strength check could not start: %s", exc.strerror)
    except ValueError:
        log.error("the passphrase strength check printed something other than its verdict")
    if not isinstance(verdict, dict) or not isinstance(verdict.get("score"), int):
        raise AegisError("the passphrase strength check could not run; see aegisd's log")
    return verdict["score"], str(verdict.get("warning") or "")


def main() -> None:
    """The child: harden first, then read the passphrase, then print zxcvbn's verdict as JSON."""
    from aegisd.hardening import harden_process

    harden_process()
    passphrase = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    from zxcvbn import zxcvbn

    result = zxcvbn(passphrase)
    json.dump({"score": int(result["score"]), "warning": result.get("feedback", {}).get("warning") or ""},
              sys.stdout)


if __name__ == "__main__":
    main()
