"""Token budgets: per agent and for everyone, reserved before a request and reconciled after.

A request reserves its estimate (prompt estimate + ``max_tokens``) before it is
forwarded, so concurrent requests cannot all slip under a nearly spent budget;
when its real usage is known the reservation is replaced by what it cost. At the
limit a request is refused; crossing ``warn_at`` (a fraction) calls ``on_warning``
once per budget.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from stigmergy.errors import BudgetExceededError, ConfigurationError

logger = logging.getLogger(__name__)

GLOBAL = "*"  # the name of the budget everyone shares


@dataclass(slots=True)
class _Account:
    limit: float
    spent: float = 0.0
    reserved: float = 0.0
    warned: bool = False


@dataclass(slots=True)
class Reservation:
    """Tokens held for one request; :meth:`TokenBudgets.settle` turns them into spending."""

    agent_id: str
    tokens: float
    accounts: list[str] = field(default_factory=list)
    open: bool = True


def _limit(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ConfigurationError(f"{what} must be a positive number of tokens, got {value!r}")
    return float(value)


class TokenBudgets:
    """Budgets in tokens: ``per_agent`` (default for every agent, or a mapping by agent) and ``total``."""

    def __init__(
        self,
        *,
        per_agent: float | Mapping[str, float] | None = None,
        total: float | None = None,
        warn_at: float = 0.8,
        on_warning: Callable[[str, float, float], None] | None = None,
    ) -> None:
        if isinstance(per_agent, Mapping):
            self._per_agent_default = None
            self._per_agent = {a: _limit(v, f"budget of agent {a!r}") for a, v in per_agent.items()}
        else:
            self._per_agent_default = _limit(per_agent, "per_agent budget")
            self._per_agent = {}
        if not 0 < warn_at <= 1:
            raise ConfigurationError(f"warn_at must be a fraction in (0, 1], got {warn_at!r}")
        self._warn_at = warn_at
        self._on_warning = on_warning
        self._accounts: dict[str, _Account] = {}
        total_limit = _limit(total, "total budget")
        if total_limit is not None:
            self._accounts[GLOBAL] = _Account(total_limit)

    def _account(self, agent_id: str) -> _Account | None:
        account = self._accounts.get(agent_id)
        if account is None:
            limit = self._per_agent.get(agent_id, self._per_agent_default)
            if limit is None:
                return None
            account = self._accounts[agent_id] = _Account(limit)
        return account

    def reserve(self, agent_id: str, tokens: float) -> Reservation:
        """Hold ``tokens`` for one request, or raise :class:`BudgetExceededError` naming the spent budget."""
        accounts = [(agent_id, own)] if (own := self._account(agent_id)) is not None else []
        if GLOBAL in self._accounts:
            accounts.append((GLOBAL, self._accounts[GLOBAL]))
        for name, account in accounts:
            if account.spent + account.reserved + tokens > account.limit:
                who = "the global budget" if name == GLOBAL else f"agent {agent_id!r}'s budget"
                raise BudgetExceededError(
                    f"{who} is spent: {account.spent:.0f} of {account.limit:.0f} tokens used, "
                    f"{account.reserved:.0f} reserved, this request needs up to {tokens:.0f}; "
                    "raise the budget or lower max_tokens"
                )
        for _, account in accounts:
            account.reserved += tokens
        return Reservation(agent_id, tokens, [name for name, _ in accounts])

    def settle(self, reservation: Reservation, spent: float) -> None:
        """Replace a reservation by what the request really cost (0 if it never reached the upstream)."""
        if not reservation.open:
            return
        reservation.open = False
        for name in reservation.accounts:
            account = self._accounts[name]
            account.reserved -= reservation.tokens
            account.spent += spent
            if not account.warned and account.spent >= self._warn_at * account.limit:
                account.warned = True
                logger.warning("token budget %s is %.0f%% spent", name, 100 * account.spent / account.limit)
                if self._on_warning is not None:
                    self._on_warning(name, account.spent, account.limit)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Budget name -> limit, spent, reserved (for metrics and explanations)."""
        return {
            name: {"limit": a.limit, "spent": a.spent, "reserved": a.reserved}
            for name, a in self._accounts.items()
        }
