"""The registrar's memory gate: registrations load their models together only while those fit in the head's memory."""
from __future__ import annotations

import threading

import pytest

from actors import registrar
from actors.registrar import MemoryGate

GB = 1 << 30


class Registration(threading.Thread):
    """A registration that holds `model_bytes` from the gate until told to finish."""

    def __init__(self, gate: MemoryGate, model_bytes: int) -> None:
        super().__init__(daemon=True)
        self.gate, self.model_bytes = gate, model_bytes
        self.loading, self.finish = threading.Event(), threading.Event()
        self.waited_s: float | None = None

    def run(self) -> None:
        with self.gate.holding(self.model_bytes) as waited_s:
            self.waited_s = waited_s
            self.loading.set()
            self.finish.wait(30)


def started(gate: MemoryGate, model_bytes: int) -> Registration:
    registration = Registration(gate, model_bytes)
    registration.start()
    return registration


def test_models_that_fit_together_are_registered_together():
    gate = MemoryGate(lambda: 100 * GB)
    first, second = started(gate, 30 * GB), started(gate, 30 * GB)
    assert first.loading.wait(10) and second.loading.wait(10)
    first.finish.set(), second.finish.set()


def test_a_model_that_does_not_fit_beside_another_waits_until_it_is_registered():
    gate = MemoryGate(lambda: 100 * GB)
    first = started(gate, 40 * GB)
    assert first.loading.wait(10)
    second = started(gate, 40 * GB)
    assert not second.loading.wait(0.5)   # 80 GB would be more than half of what the head has for them
    first.finish.set()
    assert second.loading.wait(10)        # the first one's leaving wakes it
    assert second.waited_s >= 0.5 and first.waited_s < 0.5
    second.finish.set()


def test_a_model_larger_than_the_memory_still_goes_ahead_alone():
    gate = MemoryGate(lambda: 10 * GB)
    alone = started(gate, 40 * GB)
    assert alone.loading.wait(10)
    alone.finish.set()


def test_a_waiting_model_goes_ahead_when_the_head_frees_memory(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registrar, "RECHECK_MEMORY_S", 0.05)
    available = [50 * GB]   # something else on the head holds the rest, for now
    gate = MemoryGate(lambda: available[0])
    first = started(gate, 20 * GB)
    assert first.loading.wait(10)
    second = started(gate, 20 * GB)
    assert not second.loading.wait(0.3)   # 40 GB > half of 70 GB
    available[0] = 80 * GB                # 40 GB <= half of 100 GB
    assert second.loading.wait(10)
    first.finish.set(), second.finish.set()
