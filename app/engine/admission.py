"""The order in which waiting work is admitted into a decode batch: higher priority first; within a
priority, tenants (API keys) take turns, so one tenant's burst cannot starve another; within a tenant,
arrival order. A request's shards (scheduler.py) keep their place together. And what a lane does about
deadlines and priorities before each decode step (LaneDiscipline).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from .cache import DecodeCache
from .fan_in import Shard, TrackedRequest
from .types import DeadlineExceededError

if TYPE_CHECKING:
    from .lanes import Lane


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


class LaneDiscipline:
    """What a decode lane does about deadlines and priorities before each step (Engine inherits it, through
    LaneLoop): requests past their deadline end and leave, cancelled ones are counted once, and only the
    highest priority present in a lane decodes while lower shards wait parked with their caches."""

    # The engine state these rules read and change (set by Engine.__init__).
    _lock: threading.Lock
    _counters: collections.Counter[str]
    device: torch.device
    max_batch_images: int

    @staticmethod
    def _count_cancelled(owner: TrackedRequest, counts: collections.Counter) -> None:
        """Count a cancelled request once, whichever of its shards leaves first; under the lock."""
        if owner.cancelled and not owner.cancel_counted:
            owner.cancel_counted = True
            counts["requests_cancelled"] += 1

    def _expire(self, owner: TrackedRequest, counts: collections.Counter) -> bool:
        """Note that a request's deadline passed; True the first time (the caller then fails it, outside
        the lock). Under the lock."""
        if owner.expired or owner.closed:
            return False
        owner.expired = True
        counts["requests_expired"] += 1
        return True

    @staticmethod
    def _late_error() -> DeadlineExceededError:
        return DeadlineExceededError("the request's deadline passed before it finished; its work was stopped")

    def _drop_gone_and_late(self, lane: Lane, now: float) -> list[int] | None:
        """Before a decode step (its batch is fixed at `now`): requests past their deadline end
        (DeadlineExceededError) and leave the batch, and the parked shards, with the cancelled ones, so
        no step computes a row for them. Returns the batch rows kept, or None when all are."""
        late: list[TrackedRequest] = []
        kept: list[Shard] = []
        keep: list[int] = []
        offset = 0

        def leaving(shard: Shard) -> bool:  # under the lock
            if expired(shard, now) and self._expire(shard.owner, self._counters):
                late.append(shard.owner)
            if shard.owner.gone or shard.owner.expired:
                self._count_cancelled(shard.owner, self._counters)
                return True
            return False

        with self._lock:
            for shard in lane.active:
                if not leaving(shard):
                    kept.append(shard)
                    keep.extend(range(offset, offset + shard.n))
                offset += shard.n
            if len(kept) != len(lane.active):
                lane.active = kept
                lane.images = sum(shard.n for shard in kept)
            lane.parked = [(shard, cache) for shard, cache in lane.parked if not leaving(shard)]
        for owner in late:
            owner.fail(self._late_error())
        if len(keep) == offset:
            return None
        assert lane.state is not None
        lane.state = lane.state.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None
        return keep

    def _park(self, lane: Lane, priority: int) -> None:
        """Set aside the lane's shards below `priority`, each with its caches (this lane's thread only)."""
        if lane.state is None:
            return
        kept: list[Shard] = []
        keep: list[int] = []
        offset = 0
        for shard in lane.active:
            rows = list(range(offset, offset + shard.n))
            offset += shard.n
            if shard.owner.request.priority < priority:
                index = torch.tensor(rows, dtype=torch.long, device=self.device)
                lane.parked.append((shard, lane.state.select(index)))
            else:
                kept.append(shard)
                keep.extend(rows)
        if len(kept) == len(lane.active):
            return
        lane.state = lane.state.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None
        with self._lock:
            self._counters["shards_parked"] += len(lane.active) - len(kept)
            lane.active = kept
            lane.images = sum(shard.n for shard in kept)

    def _run_by_priority(self, lane: Lane) -> None:
        """Only the highest priority present in the lane decodes: lower shards are parked, and parked
        shards resume once nothing above them is left (they take no step meanwhile)."""
        if not lane.active and not lane.parked:
            return
        top = max(shard.owner.request.priority for shard in [*lane.active, *(s for s, _ in lane.parked)])
        if any(shard.owner.request.priority < top for shard in lane.active):
            self._park(lane, top)
        resuming = [(shard, cache) for shard, cache in lane.parked if shard.owner.request.priority == top]
        room = self.max_batch_images - lane.images
        back: list[tuple[Shard, DecodeCache]] = []
        for shard, cache in resuming:
            if shard.n <= room:
                back.append((shard, cache))
                room -= shard.n
        if not back:
            return
        lane.state = DecodeCache.concat(([lane.state] if lane.state is not None else []) + [c for _, c in back])
        with self._lock:
            lane.parked = [entry for entry in lane.parked if all(entry[0] is not shard for shard, _ in back)]
            lane.active.extend(shard for shard, _ in back)
            lane.images = sum(shard.n for shard in lane.active)
