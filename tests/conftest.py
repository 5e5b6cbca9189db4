"""Shared fixtures: small SAMs of segment_anything's own classes with seeded random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_blocked.models.registry import build_sam


@pytest.fixture(autouse=True)
def _few_threads():
    # CI has 2 cores; keep torch from oversubscribing them.
    torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_real_weights(tmp_path_factory, monkeypatch):
    # A developer's downloaded checkpoints must not leak into tests.
    monkeypatch.setattr("sam_blocked.models.checkpoints.default_weights_dir", lambda: tmp_path_factory.mktemp("no_weights"))
    monkeypatch.delenv("SAM_BLOCKED_WEIGHTS", raising=False)


@pytest.fixture
def tiny_sam():
    """A 2-block SAM (embed 64, 2 heads, one global block) at 1024 px, random weights."""
    return build_sam("tiny", seed=0)


@pytest.fixture(scope="session")
def photo() -> np.ndarray:
    """A real photograph from scikit-image's wheel: (512, 512, 3) uint8 RGB."""
    from skimage import data

    return data.astronaut()
