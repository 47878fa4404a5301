"""What the daemon's parts share while it runs: settings, storage, the vault, agents, its start time."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aegisd.agents import AgentRegistry
from aegisd.cancellation import finished
from aegisd.config import Config
from aegisd.errors import WrongPassphrase
from aegisd.ledger import LedgerEntry, LedgerError, LedgerWriter
from aegisd.logs import event
from aegisd.policy import PolicyStore
from aegisd.store import VaultStore
from aegisd.vault.vault import Vault
from aegisd.webhooks import Webhooks

log = logging.getLogger("aegisd")
T = TypeVar("T")
# Where control calls derive keys from a secret (Argon2id: a second or more each at a costly kdf_memory_mib). The vault
# runs derivations one at a time anyway; queued here, calls waiting their turn hold no thread of the default pool,
# which every store read, the metrics scrape and the gate's redaction compiles share: a few unlocks at once, or a
# flood of guesses, used to fill it and hold all of those up until the derivations were done.
KEY_DERIVATION = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aegis-kdf")


@dataclass
class Runtime:
    config: Config
    store: VaultStore
    vault: Vault
    agents: AgentRegistry
    ledger: LedgerWriter
    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)  # uptime: a clock step never makes it negative
    webhooks: Webhooks | None = None  # set by the daemon once its event loop runs
    policies: PolicyStore = field(default_factory=lambda: PolicyStore(None))  # the daemon sets the live one

    def log_event(self, message: str, *, level: int = logging.INFO, **fields: Any) -> None:
        """An operator-visible event (at info level unless said); fields must never hold a secret."""
        event(log, level, message, **fields)

    async def record_change(self, detail: str, reason: str) -> None:
        """A change an operator made that the ledger must show (a key change, a credential widened), as a system
        row. Once the ledger has its key the call answers only after the row commits, so a crash right after the
        answer cannot keep the change and lose its record; before that the row is held until the key comes. The
        change has happened by now, so a ledger that cannot take the row is logged, never the call's error."""
        entry = LedgerEntry.system(detail, reason=reason)
        try:
            if self.ledger.has_key:
                await self.ledger.append(entry)
            else:
                self.ledger.append_nowait(entry)
        except LedgerError as exc:
            log.error("a change could not be put in the ledger (%s): %s", reason, exc)

    async def prove_passphrase(self, passphrase: str, what: str, **fields: Any) -> None:
        """Raise WrongPassphrase unless `passphrase` opens the vault, for a change the control socket alone must not
        make; a wrong one is logged as a failed unlock is (the change and `fields`, never the input)."""
        try:
            await derive(self.vault, self.vault.verify_passphrase, passphrase)
        except WrongPassphrase:
            self.log_event(f"{what} refused: wrong passphrase", level=logging.WARNING, **fields)
            raise
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the caller went away during the proof: no change for it now
            raise asyncio.CancelledError

    def ledger_key(self) -> bytes | None:
        """The ledger's chain key: known once the vault has been unlocked since start."""
        return self.ledger.key


async def derive(vault: Vault, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call `method`, a method of `vault` that derives keys from a secret and takes `as_of` (unlock, verify_passphrase,
    the key changes), in the key-derivation thread. The vault is read now, as the call comes in, and the method
    compares with that: a lock() (or another change) that comes while the call waits its turn there fails it, as
    one during its derivation does, rather than being overtaken by it."""
    as_of = await asyncio.to_thread(vault.read_state)
    return await key_derivation(functools.partial(method, *args, as_of=as_of, **kwargs))


async def key_derivation(call: Callable[[], T]) -> T:
    """`call`'s result, run in the key-derivation thread (KEY_DERIVATION). A caller cancelled while it waits there
    (its client went away, or its deadline passed) takes its call out of the queue: it never runs. One cancelled
    once its call has begun still gets the outcome, and the cancellation goes on at its next await: the derivation
    cannot be stopped, and what it did (the vault unlocked, a key slot replaced, a wrong guess) must be logged and
    recorded by the caller all the same, or a short deadline would make guesses and key changes leave no trace."""
    job = KEY_DERIVATION.submit(call)
    try:
        return await asyncio.wrap_future(job)
    except asyncio.CancelledError:
        if job.cancel():  # still queued (or already taken out by the cancellation): it never runs
            raise
    await finished(asyncio.wrap_future(job))
    task = asyncio.current_task()
    if task is not None:
        task.cancel()  # the caller's own cancellation, put back for its next await
    return job.result()
