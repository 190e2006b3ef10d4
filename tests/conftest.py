import os
from pathlib import Path

# Triton kernels (kernels/grape_ap.py, fla's) run on CPU tensors under Triton's interpreter: it must be chosen before
# Triton is first imported. Where CUDA is present the kernels run compiled (an explicit TRITON_INTERPRET wins).
if not Path("/dev/nvidia0").exists() and not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from data.fineweb_edu import prepare
from data.sources import FileSource

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """For files of tiny tensors (pytestmark = pytest.mark.usefixtures("one_thread")): one thread is as fast, and
    immune to the stalls a second OpenMP thread suffers when another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def byte_shards(tmp_path_factory):
    """Jane Austen (from the embedded sample) as UTF-8 bytes (data/fineweb_edu.py --tokenizer bytes: ids 0..255,
    EOT 256; model vocab_size 320) in 64k-token shards: shard 0, the validation split, and the training shards come
    from the same novels. With a 257-token vocabulary a CPU-sized model gets well past the unigram statistics within
    a minute, and a training step costs a fraction of one with GPT-2's 50,257 tokens (whose embedding and head are
    most of a tiny model's work), so tests that train for their own sake (resume, faults, sweeps) use these."""
    out = tmp_path_factory.mktemp("byte_shards")
    prepare(FileSource([REPO / "data" / "sample" / "3_austen.txt.gz"]), out, shard_size=65536, prefix="austen",
            workers=0, progress=False, tokenizer_name="bytes")
    return out
