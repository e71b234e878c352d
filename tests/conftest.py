"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_cifar10() -> Path:
    """The full CIFAR-10 parquet beside the checkout (../shared/data/cifar10); skips when absent (fresh clones)."""
    if not (SHARED_CIFAR10 / "test-00000-of-00001.parquet").exists():
        pytest.skip(f"full CIFAR-10 not found at {SHARED_CIFAR10} (only present on the developers' machines)")
    return SHARED_CIFAR10
