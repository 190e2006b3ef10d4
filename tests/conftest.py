import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)
    yield
