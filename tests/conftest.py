"""Shared fixtures: the synthetic benchmark, the shared real-data folder, a data root per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("METABENCH_SHARED_DATA", REPO.parent / "shared" / "data"))

# Two threads by default (CI runs alone on 2 cores); METABENCH_TEST_THREADS=1 when the machine is shared,
# since oversubscribed OpenMP threads slow training down by an order of magnitude.
torch.set_num_threads(int(os.environ.get("METABENCH_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; the test is skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One data root for the whole test session (generated caches are reused across tests)."""
    env = os.environ.get("METABENCH_TEST_ROOT")
    return Path(env) if env else tmp_path_factory.mktemp("metabench-root")


@pytest.fixture(scope="session")
def synthetic_set():
    """EpisodeSet of the synthetic-5w1s benchmark."""
    from bench.benchmarks import load

    return load("synthetic-5w1s", Path("/nonexistent-root-not-needed"))


@pytest.fixture(scope="module")
def omniglot_small(shared_data, data_root):
    """EpisodeSet of omniglot-small-5w1s (the real Omniglot subsets in the shared data folder); skipped without them."""
    from bench.benchmarks import load

    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        if not (shared_data / "omniglot" / name).is_file():
            pytest.skip(f"shared data not available: {shared_data / 'omniglot' / name}")
    return load("omniglot-small-5w1s", data_root)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (faster than two for them; restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
