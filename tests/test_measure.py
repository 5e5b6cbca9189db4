"""One available-memory reader and one peak measurement (sam_blocked.memory.measure), used by every caller."""

from __future__ import annotations

import torch

from sam_blocked.memory import measure


def test_every_caller_uses_the_one_reader_and_the_one_peak():
    from sam_blocked.cli import segment as cli_segment
    from sam_blocked.engines import unit
    from sam_blocked.interactive import whole

    assert unit.available_bytes is cli_segment.available_bytes is whole.available_bytes is measure.available_bytes
    assert unit.reset_peak_memory is measure.reset_peak_memory
    assert whole.measure_peak is measure.measure_peak
    assert not hasattr(whole, "_free_bytes") and not hasattr(whole, "_measure")


def test_measure_peak_is_the_peak_over_what_was_in_use_before(monkeypatch):
    # the resident high-water mark depends on what the process did before (glibc keeps freed
    # memory): the rule is checked against a stand-in reading, not the machine's
    readings = {"current": 100, "peak": 0}

    def reset(device):
        readings["peak"] = readings["current"]

    def fn():
        readings["peak"] = readings["current"] + 64

    monkeypatch.setattr(measure, "reset_peak", reset)
    monkeypatch.setattr(measure, "current_bytes", lambda device: readings["current"])
    monkeypatch.setattr(measure, "peak_bytes", lambda device: readings["peak"])
    assert measure.measure_peak("cpu", fn) == 64
    readings["current"] = 200  # fn freed more than it took: never below 0
    assert measure.measure_peak("cpu", lambda: readings.update(current=100)) == 0


def test_the_cpu_readers_answer():
    assert measure.reset_peak_memory("cpu") is True
    free = measure.available_bytes("cpu")
    assert free is not None and free > 0
    assert measure.measure_peak("cpu", lambda: torch.ones(2**20).sum()) >= 0
