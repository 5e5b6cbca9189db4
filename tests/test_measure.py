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


def test_measure_peak_counts_what_fn_holds_at_once():
    held = measure.measure_peak("cpu", lambda: torch.ones(64 * 2**20 // 4).sum())  # 64 MiB, touched
    assert held >= 60 * 2**20
    assert measure.reset_peak_memory("cpu") is True
    free = measure.available_bytes("cpu")
    assert free is not None and free > 0
