"""Shared pytest fixtures."""

from __future__ import annotations

import os

# One thread per process: the suite runs on 2 cores, and tests that start 2 processes (torchrun) or compile kernels
# oversubscribe them badly with torch's default thread count. Eager fused kernels: torch.compile costs a minute per
# process on a CPU; the tests of the compiled path select it explicitly. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GMPQ_FUSED_BACKEND", "eager")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = REPO.parent / "shared" / "data" / "cifar10"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--timm-tail", action="store_true",
                     help="also run the long tail of the timm sweep (tests marked timm_tail; .ci/run does)")
    parser.addoption("--slow", action="store_true",
                     help="also run the slow tests (marked slow: process kills, torchrun, real-data checks; "
                          ".ci/run does)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timm_tail: the slower families of the timm sweep (run with --timm-tail)")
    config.addinivalue_line("markers", "slow: tests over ~20 s each (run with --slow)")


#: marker -> (the option that runs its tests, the reason they are skipped without it).
_OPT_IN = {
    "timm_tail": ("--timm-tail", "long tail of the timm sweep: run with --timm-tail (.ci/run does)"),
    "slow": ("--slow", "slow test: run with --slow (.ci/run does)"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (option, reason) in _OPT_IN.items():
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_cifar10() -> Path:
    """The full CIFAR-10 parquet beside the checkout (../shared/data/cifar10); skips when absent (fresh clones)."""
    if not (SHARED_CIFAR10 / "test-00000-of-00001.parquet").exists():
        pytest.skip(f"full CIFAR-10 not found at {SHARED_CIFAR10} (only present on the developers' machines)")
    return SHARED_CIFAR10


SHARED_MODELS = REPO.parent / "shared" / "models"


@pytest.fixture
def shared_models() -> Path:
    """The pretrained CIFAR ResNets beside the checkout (../shared/models); skips when absent (fresh clones)."""
    if not (SHARED_MODELS / "resnet20_cifar10.safetensors").exists():
        pytest.skip(f"pretrained CIFAR ResNets not found at {SHARED_MODELS} (only present on the developers' machines)")
    return SHARED_MODELS
