from pathlib import Path

import pytest
import torch

from data.fineweb_edu import prepare
from data.sources import FileSource

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_every_test():
    """Every test starts from the same RNG state, so a failure reproduces."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The sample's Wikipedia and Austen files as 64k-token shards (shard 0 = validation), read-only for tests."""
    out = tmp_path_factory.mktemp("shards")
    files = sorted((REPO / "data" / "sample").glob("*.txt.gz"))
    prepare(FileSource([f for f in files if "brown" not in f.name]), out, shard_size=65536, prefix="sample",
            workers=0, progress=False)
    return out
