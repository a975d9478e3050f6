"""The order in which waiting work is admitted into a decode batch: higher priority first; within a
priority, tenants (API keys) take turns, so one tenant's burst cannot starve another; within a tenant,
arrival order. A request's shards (scheduler.py) keep their place together. And what a lane does about
deadlines and priorities before each decode step (LaneDiscipline): a lane holds its images in groups of
at most `step_images`, each step decodes one row of one group, only the highest priority present
decodes, and the groups of that priority take turns. So a higher-priority arrival waits for one short
step, never for a row of the lane's whole batch, and setting lower work aside copies nothing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cache import DecodeCache
from .fan_in import Shard, TrackedRequest
from .types import DeadlineExceededError

# How long after work of two priorities last met in the engine its steps stay half-size (mixed_step_images):
# long enough to span the gaps of a steady premium trickle, short enough that a past burst soon stops costing.
MIXED_PRIORITIES_HOLD_S = 10.0

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


@dataclass(frozen=True)
class Group:
    """Shards waiting in a lane for their turn to decode, with their caches (images in shard order)."""

    shards: list[Shard]
    cache: DecodeCache

    @property
    def n(self) -> int:
        return sum(shard.n for shard in self.shards)

    @property
    def priority(self) -> int:
        return max(shard.owner.request.priority for shard in self.shards)


def image_rows(shards: list[Shard], wanted: Iterable[Shard]) -> list[int]:
    """The batch rows of the `wanted` shards' images in a batch of `shards` (in that order)."""
    chosen = {id(shard) for shard in wanted}
    rows: list[int] = []
    offset = 0
    for shard in shards:
        if id(shard) in chosen:
            rows.extend(range(offset, offset + shard.n))
        offset += shard.n
    return rows


def in_steps(shards: list[Shard], room: int, step_images: int) -> list[list[Shard]]:
    """`shards` cut in order into consecutive parts: the first of at most `room` images (possibly empty),
    the others of at most `step_images` each (a larger shard is a part of its own)."""
    parts: list[list[Shard]] = [[]]
    limit, images = room, 0
    for shard in shards:
        if images + shard.n > limit and (parts[-1] or len(parts) == 1):
            parts.append([])
            limit, images = step_images, 0
        parts[-1].append(shard)
        images += shard.n
    return parts


class LaneDiscipline:
    """What a decode lane does about deadlines and priorities before each step (Engine inherits it, through
    LaneLoop): requests past their deadline end and leave, cancelled ones are counted once, only the
    highest priority present in a lane decodes while the others wait in groups with their caches, and
    the groups of that priority take turns, one row each."""

    # The engine state these rules read and change (set by Engine.__init__).
    _lock: threading.Lock
    _counters: collections.Counter[str]
    device: torch.device
    max_batch_images: int
    step_images: int
    mixed_step_images: int
    _mixed_until: float

    def _step_images_now(self) -> int:
        """The most images a step draws now: half as many while priorities mix (Engine.__init__ says why)."""
        return self.mixed_step_images if time.monotonic() < self._mixed_until else self.step_images

    @staticmethod
    def _count_cancelled(owner: TrackedRequest, counts: collections.Counter) -> None:
        """Count a cancelled request once, whichever of its shards leaves first, and not one already counted
        as expired (its caller gave up before reading that error; another lane finds it gone); under the lock."""
        if owner.cancelled and not owner.cancel_counted and not owner.expired:
            owner.cancel_counted = True
            counts["requests_cancelled"] += 1

    def _expire(self, owner: TrackedRequest, counts: collections.Counter) -> bool:
        """Note that a request's deadline passed; True the first time (the caller then fails it, outside
        the lock). Not for one its caller cancelled first (counted as cancelled: every request ends counted
        once). Under the lock."""
        if owner.expired or owner.closed or owner.cancelled:
            return False
        owner.expired = True
        counts["requests_expired"] += 1
        return True

    @staticmethod
    def _late_error() -> DeadlineExceededError:
        return DeadlineExceededError("the request's deadline passed before it finished; its work was stopped")

    def _select(self, cache: DecodeCache, rows: list[int]) -> DecodeCache:
        return cache.select(torch.tensor(rows, dtype=torch.long, device=self.device))

    def _drop_gone_and_late(self, lane: Lane, now: float) -> list[int] | None:
        """Before a decode step (its batch is fixed at `now`): requests past their deadline end
        (DeadlineExceededError) and leave the batch and the waiting groups, with the cancelled ones, so
        no step computes a row for them. Returns the batch rows kept, or None when all are."""
        late: list[TrackedRequest] = []

        def leaving(shard: Shard) -> bool:  # under the lock
            if expired(shard, now) and self._expire(shard.owner, self._counters):
                late.append(shard.owner)
            if shard.owner.gone or shard.owner.expired:
                self._count_cancelled(shard.owner, self._counters)
                return True
            return False

        with self._lock:
            batch = lane.active
            kept = [shard for shard in batch if not leaving(shard)]
            lane.active = kept
            lane.images = sum(shard.n for shard in kept)
            staying = [[shard for shard in group.shards if not leaving(shard)] for group in lane.groups]
        for owner in late:
            owner.fail(self._late_error())
        if any(len(shards) != len(group.shards) for group, shards in zip(lane.groups, staying)):
            # Only this lane's thread changes its groups; the lock guards what other threads read of them.
            trimmed = [
                group
                if len(shards) == len(group.shards)
                else Group(shards, self._select(group.cache, image_rows(group.shards, shards)))
                for group, shards in zip(lane.groups, staying)
                if shards
            ]
            with self._lock:
                lane.groups = trimmed
        if len(kept) == len(batch):
            return None
        keep = image_rows(batch, kept)
        assert lane.state is not None
        lane.state = self._select(lane.state, keep) if keep else None
        return keep

    def _set_aside(self, lane: Lane, priority: int) -> None:
        """Move the lane's shards below `priority` out of its batch into groups, one per priority, each
        with its caches (this lane's thread only). A batch that leaves whole is moved, not copied."""
        if lane.state is None:
            return
        below = sorted({s.owner.request.priority for s in lane.active if s.owner.request.priority < priority})
        if not below:
            return
        kept = [shard for shard in lane.active if shard.owner.request.priority >= priority]
        if not kept and len(below) == 1:
            parked = [Group(lane.active, lane.state)]
        else:
            parked = []
            for level in reversed(below):
                shards = [shard for shard in lane.active if shard.owner.request.priority == level]
                parked.append(Group(shards, self._select(lane.state, image_rows(lane.active, shards))))
        state = self._select(lane.state, image_rows(lane.active, kept)) if kept else None
        with self._lock:
            self._counters["shards_parked"] += len(lane.active) - len(kept)
            lane.groups = lane.groups + parked
            lane.active, lane.state = kept, state
            lane.images = sum(shard.n for shard in kept)

    def _take_turn(self, lane: Lane) -> None:
        """Choose what this step decodes: only the highest priority present in the lane (lower shards are
        set aside), and the groups of that priority in turn, one row each: the batch goes to the back of
        the lane's groups and the first group of that priority takes its place, joined by the next ones
        while they fit in `step_images`."""
        present = lane.shards()
        if not present:
            return
        top = max(shard.owner.request.priority for shard in present)
        self._set_aside(lane, top)
        turn = [group for group in lane.groups if group.priority == top]
        if not turn:
            return
        current = [Group(lane.active, lane.state)] if lane.active and lane.state is not None else []
        queue = turn + current  # the batch that just decoded goes to the back
        chosen, images, step_images = [queue[0]], queue[0].n, self._step_images_now()
        for group in queue[1:]:
            if images + group.n > step_images:
                break
            chosen.append(group)
            images += group.n
        batch = DecodeCache.concat([group.cache for group in chosen])
        resting = [group for group in lane.groups + current if all(group is not c for c in chosen)]
        with self._lock:
            lane.groups = resting
            lane.active = [shard for group in chosen for shard in group.shards]
            lane.state = batch
            lane.images = images
