"""The order in which waiting work is admitted into a decode batch: higher priority first; within a
priority, tenants (API keys) take turns, so one tenant's burst cannot starve another; within a tenant,
arrival order. A request's shards (scheduler.py) keep their place together.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable

from .fan_in import Shard


def admission_order(waiting: Iterable[Shard]) -> list[Shard]:
    """`waiting` (in arrival order) sorted for admission: by priority (highest first), then by the
    request's turn among its tenant's waiting requests (round robin), then by arrival."""
    turns: dict[int, int] = {}  # id(owner) -> its rank among its tenant's waiting requests
    taken: collections.Counter[str] = collections.Counter()
    keyed = []
    for arrival, shard in enumerate(waiting):
        owner = shard.owner
        if id(owner) not in turns:
            turns[id(owner)] = taken[owner.request.tenant]
            taken[owner.request.tenant] += 1
        keyed.append(((-owner.request.priority, turns[id(owner)], arrival), shard))
    return [shard for _, shard in sorted(keyed, key=lambda item: item[0])]


def expired(shard: Shard, now: float | None = None) -> bool:
    """The shard's request has a deadline and it has passed."""
    deadline = shard.owner.request.deadline
    return deadline is not None and (time.monotonic() if now is None else now) >= deadline
