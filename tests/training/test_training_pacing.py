"""A job's share of device time while requests are served: it waits what it owes, and only then."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from loraserve.core.model.turns import DeviceTurns
from loraserve.server.training.pacing import SharedTurns


def timed_turn(turns, work: float = 0.0) -> float:
    """Seconds from asking for a turn to getting it; the turn itself lasts `work` seconds."""
    start = time.monotonic()
    with turns.turn():
        waited = time.monotonic() - start
        time.sleep(work)
    return waited


def test_waits_its_debt_only_while_serving():
    serving = [True]
    cancel = threading.Event()
    turns = SharedTurns(DeviceTurns(), lambda: serving[0], share=0.25, cancel=cancel)
    assert timed_turn(turns, work=0.1) < 0.1  # nothing owed yet
    assert timed_turn(turns) >= 0.29  # 0.1 s of device time at a quarter share: 0.3 s for serving
    serving[0] = False
    timed_turn(turns, work=0.1)
    assert timed_turn(turns) < 0.1  # an idle engine needs no time
    serving[0] = True
    timed_turn(turns, work=0.2)
    cancel.set()
    assert timed_turn(turns) < 0.1  # a cancel is not kept waiting


def test_a_full_share_alternates_freely():
    turns = SharedTurns(DeviceTurns(), lambda: True, share=1.0, cancel=threading.Event())
    timed_turn(turns, work=0.1)
    assert timed_turn(turns) < 0.1


def test_the_engine_decodes_while_the_job_waits():
    device = DeviceTurns()
    turns = SharedTurns(device, lambda: True, share=0.5, cancel=threading.Event())
    timed_turn(turns, work=0.3)
    engine_turns = []
    stop = threading.Event()

    def engine():
        while not stop.is_set():
            engine_turns.append(timed_turn(device, work=0.005))

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        timed_turn(turns)  # owes 0.3 s: the engine runs its steps meanwhile, none waiting for the job
    finally:
        stop.set()
        thread.join()
    assert len(engine_turns) >= 10 and max(engine_turns) < 0.15


def test_the_share_is_checked():
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        SharedTurns(contextlib.nullcontext(), lambda: True, share=0.0, cancel=threading.Event())
