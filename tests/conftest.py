"""Shared fixtures: offline, passive OpenMP threads, seeded, and a throwaway epbench cache per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same RNG state."""
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    from bench.models import load_model

    return load_model("tiny-gemma2")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (its fp32 cache lives in the user cache, shared across sessions)."""
    from bench.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    """A throwaway epbench cache for one test module (what it generates and extracts stays out of the user's)."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("epbench-cache")
        mp.setenv("EPBENCH_CACHE", str(root))
        yield root
