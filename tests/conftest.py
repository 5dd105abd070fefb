import os

import pytest
import torch

import tdkd_cli  # noqa: F401  (installs the torchvision shim before any test imports transformers or timm)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Keep the tokenization cache of test runs out of the user's ~/.cache."""
    os.environ["TDKD_CACHE"] = str(tmp_path_factory.mktemp("tdkd-cache"))
    yield


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
