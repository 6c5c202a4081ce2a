import os

import pytest
import torch

# two pytest-xdist workers on two cores: one thread each keeps them from fighting
torch.set_num_threads(int(os.environ.get("CONDENSEVIT_TEST_THREADS", "1")))

FIXTURES = os.path.abspath(os.environ.get(
    "CONDENSEVIT_FIXTURES",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir():
    if not os.path.isdir(FIXTURES):
        pytest.fail(f"parity fixtures not found at {FIXTURES}; set CONDENSEVIT_FIXTURES")
    return FIXTURES
