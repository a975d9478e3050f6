"""The scorer runs a request's forward passes side by side on its threads (one per decode lane: every core
on a CPU), with the same numbers as one after another, below the decode lanes' CPU priority, and stops the
passes not started once one fails, its caller leaves, its deadline passes or the engine stops."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from app.engine import EngineStoppedError, ScoringError
from app.engine.scoring import SCORE_CHUNK_IMAGES, Scorer, ScoringCancelled
from app.engine.types import DeadlineExceededError
from tests.helpers import failing_once, tiny_model, torch_threads

# 20 images: 2 chunks (16 + 4); the 3-class model without labels: 2 x 3 class passes, then 2 per-pixel passes.
IMAGES = 20
PASSES = 2 * 3 + 2


@pytest.fixture(scope="module")
def model():
    return tiny_model("gated", num_classes=3, dtype=torch.float32)


def images(n: int = IMAGES) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)


class PairedPasses(nn.Module):
    """The model, except that each forward pass waits until another one runs beside it (a barrier of two):
    passes run one after another never get through. Records the threads the passes ran on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = model, model.config
        self.barrier = threading.Barrier(2, timeout=10)
        self.threads: set[int] = set()

    def forward(self, *args, **kwargs):
        self.threads.add(threading.get_ident())
        self.barrier.wait()
        return self.inner(*args, **kwargs)


def test_passes_run_side_by_side_with_the_numbers_of_one_thread(model):
    assert IMAGES > SCORE_CHUNK_IMAGES  # two chunks
    with torch_threads(1):
        alone = Scorer(model, max_in_flight=1).score_sync(images())
        side_by_side = Scorer(model, max_in_flight=1, threads=2)
        side_by_side.model = PairedPasses(model)
        try:
            together = side_by_side.score_sync(images())
        finally:
            side_by_side.close()
    assert len(side_by_side.model.threads) == 2 and side_by_side.passes == PASSES
    for field in ("nll_nats", "per_pixel", "labels", "class_log_probs"):
        assert np.array_equal(getattr(alone, field), getattr(together, field)), field
    with torch.no_grad():  # and the marginal is the one written out from each class's pass
        per_class = torch.stack(
            [model(images().long(), torch.full((IMAGES,), y)).log_softmax(1) for y in range(3)], dim=1
        )
    labelled = images().long()[:, None, None].expand(-1, 3, 1, -1, -1, -1)
    nll = -per_class.gather(2, labelled).flatten(2).sum(2).double()
    marginal = -(torch.logsumexp(-nll, dim=1) - np.log(3))
    np.testing.assert_allclose(together.nll_nats, marginal.numpy(), rtol=1e-5)


def test_a_failing_pass_stops_those_not_started_and_is_the_error(model):
    scorer = Scorer(model, max_in_flight=1, threads=2)
    scorer._forward = failing_once(scorer._forward, after_calls=1, error=MemoryError("out of memory"))
    try:
        with pytest.raises(ScoringError, match=r"the likelihood pass failed \(MemoryError: out of memory\)"):
            scorer.score_sync(images())
    finally:
        scorer.close()
    assert scorer.failed == 1 and scorer.passes < PASSES


def test_a_passed_deadline_or_a_gone_caller_starts_no_pass_and_counts_once(model):
    scorer = Scorer(model, max_in_flight=1, threads=2)
    try:
        with pytest.raises(DeadlineExceededError):
            scorer.score_sync(images(), deadline=time.monotonic() - 1)
        gone = threading.Event()
        gone.set()
        with pytest.raises(ScoringCancelled):
            scorer.score_sync(images(), gone=gone)
    finally:
        scorer.close()
    assert scorer.expired == 1 and scorer.passes == 0


def test_closing_the_scorer_ends_a_request_whose_passes_wait(model):
    """Engine.stop closes its scorer: passes still queued are dropped and their request told why."""
    scorer = Scorer(model, max_in_flight=1, threads=2)
    started = threading.Event()

    class Slow(nn.Module):
        config = model.config

        def forward(self, *args, **kwargs):
            started.set()
            time.sleep(0.2)
            return model(*args, **kwargs)

    scorer.model = Slow()
    outcome: list[BaseException | None] = []

    def score() -> None:
        try:
            scorer.score_sync(images())
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - what the request got is the assertion
            outcome.append(error)

    thread = threading.Thread(target=score)
    thread.start()
    assert started.wait(5)
    scorer.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], EngineStoppedError), outcome


class RecordsPriority(nn.Module):
    """The model, recording the CPU priority (nice value) of each thread a forward pass runs on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = model, model.config
        self.nice: dict[int, int] = {}

    def forward(self, *args, **kwargs):
        thread = threading.get_native_id()
        self.nice[thread] = os.getpriority(os.PRIO_PROCESS, thread)
        return self.inner(*args, **kwargs)


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
@pytest.mark.parametrize(("threads", "labelled"), [(2, False), (1, True)])
def test_passes_run_below_the_callers_cpu_priority(model, threads, labelled):
    """Every pass (side by side, or the single pass of a labelled request) runs on a scorer thread `nice`
    steps below the caller's priority; the caller's own priority (a decode lane's) does not change."""
    caller = own_nice()
    scorer = Scorer(model, max_in_flight=1, threads=threads, nice=3)
    scorer.model = RecordsPriority(model)
    try:
        scorer.score_sync(images(4), [0] * 4 if labelled else None)
    finally:
        scorer.close()
    assert scorer.model.nice and set(scorer.model.nice.values()) == {min(19, caller + 3)}
    assert threading.get_native_id() not in scorer.model.nice and own_nice() == caller


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")
def test_nice_zero_keeps_the_priority_and_a_negative_one_is_refused(model):
    caller = own_nice()
    scorer = Scorer(model, max_in_flight=1, threads=2, nice=0)
    scorer.model = RecordsPriority(model)
    try:
        scorer.score_sync(images(4))
    finally:
        scorer.close()
    assert set(scorer.model.nice.values()) == {caller}
    with pytest.raises(ValueError, match="nice must be >= 0"):
        Scorer(model, max_in_flight=1, nice=-1)


def test_a_refused_priority_change_is_logged_and_scoring_goes_on(model, monkeypatch, caplog):
    """Where the system refuses setpriority (a seccomp profile, say) the passes still run, at the caller's
    priority, and the log says why."""
    alone = Scorer(model, max_in_flight=1, threads=1, nice=0)

    def refuse(*args):
        raise PermissionError("operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    monkeypatch.setattr(sys, "platform", "linux")
    scorer = Scorer(model, max_in_flight=1, threads=2, nice=5)
    try:
        with caplog.at_level("WARNING", logger="app.engine.scoring"):
            result = scorer.score_sync(images(4))
        expected = alone.score_sync(images(4))
    finally:
        scorer.close()
        alone.close()
    assert np.array_equal(result.nll_nats, expected.nll_nats)
    assert "scoring threads keep their CPU priority: setpriority failed (operation not permitted)" in caplog.text
