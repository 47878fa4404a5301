"""--rate-limit and `agent set-rate-limit`'s RATE: N/UNIT as given, or `none` for no limit.

The API reads an empty rate limit as "no limit" (on a change: "remove the limit"). An empty or blank value
given here is most often an unset shell variable (`--rate-limit "$RATE"`), so it is a usage error rather than
a limit silently removed: only the word `none` says no limit.
"""

from __future__ import annotations

import click

NONE = "none"


class RateLimit(click.ParamType):  # type: ignore[type-arg]
    """A click type: the rate as given (aegisd checks its form), "" for `none`, a usage error when blank."""

    name = "rate"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if not text.strip():
            self.fail(f"{'an empty' if not text else 'a blank'} rate; give N/UNIT (e.g. 100/min), or '{NONE}' "
                      "for no limit (nothing was sent)", param, ctx)
        return "" if text.strip().lower() == NONE else text
