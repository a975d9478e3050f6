"""The engine's counters and timing histograms, kept without a metrics library (the server exports them)."""

from __future__ import annotations

from .types import TimeSnapshot

TIME_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class TimeHistogram:
    """Cumulative counts of durations per upper bound (seconds) and their sum; what a Prometheus
    histogram exports, kept here so that the engine needs no metrics library. Changed under a lock."""

    def __init__(self, bounds: tuple[float, ...] = TIME_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if seconds <= b), len(self.bounds))] += 1
        self.total_s += seconds

    def snapshot(self) -> TimeSnapshot:
        return TimeSnapshot(list(self.bounds), list(self.counts), self.total_s)
