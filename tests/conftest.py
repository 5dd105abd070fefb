import os
import signal

import pytest
import torch
from hypothesis import settings

import tdkd_cli  # noqa: F401  (installs the torchvision shim before any test imports transformers or timm)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Property tests draw the same examples on every run of the suite (a red CI run can be reproduced);
# `make fuzz` (HYPOTHESIS_PROFILE=fuzz) draws fresh random examples, many more of them.
settings.register_profile("default", derandomize=True, max_examples=60, deadline=None, print_blob=True)
settings.register_profile("fuzz", derandomize=False, max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# A test that hangs fails on its own with a traceback instead of stalling the whole suite. Not an
# Exception: code under test that turns any Exception into its own error must not swallow it.
TEST_TIMEOUT_S = int(os.environ.get("TDKD_TEST_TIMEOUT", "600"))


class Overtime(BaseException):
    pass


@pytest.fixture(autouse=True)
def _time_limit(request):
    if not hasattr(signal, "SIGALRM") or TEST_TIMEOUT_S <= 0:
        yield
        return

    def expired(signum, frame):
        raise Overtime(f"{request.node.nodeid} ran longer than {TEST_TIMEOUT_S} s (TDKD_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Keep the tokenization cache of test runs out of the user's ~/.cache."""
    os.environ["TDKD_CACHE"] = str(tmp_path_factory.mktemp("tdkd-cache"))
    yield


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
