"""The per-agent cap on requests in flight, so one runaway agent cannot hold every upstream connection."""

from __future__ import annotations


class ConcurrencyLimiter:
    """Counts requests in flight per agent; a slot is held from admission until the response ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str, int] = {}
        self._held: dict[str, str] = {}  # request id -> agent id

    def available(self, agent_id: str) -> int:
        """Slots the agent has left (checked before anything is taken, like the rate limits)."""
        return self.limit - self._active.get(agent_id, 0)

    def acquire(self, request_id: str, agent_id: str) -> None:
        """Take a slot for this request; the pipeline releases it by request id when the request ends."""
        self._active[agent_id] = self._active.get(agent_id, 0) + 1
        self._held[request_id] = agent_id

    def release(self, request_id: str) -> None:
        """Give back the request's slot; a request that never got one is a no-op."""
        agent_id = self._held.pop(request_id, None)
        if agent_id is None:
            return
        left = self._active[agent_id] - 1
        if left:
            self._active[agent_id] = left
        else:
            del self._active[agent_id]
