import os

import pytest
import torch

# two pytest-xdist workers on two cores: one thread each keeps them from fighting
torch.set_num_threads(int(os.environ.get("CONDENSEVIT_TEST_THREADS", "1")))

FIXTURES = os.path.abspath(os.environ.get("CONDENSEVIT_FIXTURES") or
                           os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fixtures_dir():
    """The parity fixtures (outputs of the authors' released STViT-R code on fixed inputs). They are
    not in the repository: they live in the project's shared folder, ``../shared/fixtures`` beside
    the checkout (or ``CONDENSEVIT_FIXTURES``). Without them the parity tests are skipped, saying
    so; under CI (``CI`` set, as ``.ci/run`` does) they must be there, and their absence fails."""
    return find_fixtures(FIXTURES)


def find_fixtures(path: str) -> str:
    """``path`` when it holds the fixtures; else a skip naming where they come from, or, under CI, a failure."""
    if not os.path.isdir(path):
        msg = (f"parity fixtures not found at {path}: they come from the project's shared folder "
               "(../shared/fixtures beside the checkout, made from the authors' released STViT-R code), not from "
               "the repository; set CONDENSEVIT_FIXTURES=PATH to a copy")
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI is set: CI must have them)")
        pytest.skip(msg)
    return path
