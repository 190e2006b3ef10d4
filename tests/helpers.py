"""Helpers shared by test modules.

Floating-point results on a CPU depend on the number of threads (a parallel reduction splits its sum by thread,
and the rounding follows the split), on the instruction set the kernels dispatch to, and on the BLAS build. A test
that compares two computations bit for bit therefore runs both under one thread setting, in one process or in
children told the same, whatever the machine's default is."""

import contextlib
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
COMPARE_THREADS = 1  # the thread count of every computation a test compares with another bit for bit


@contextlib.contextmanager
def torch_threads(n=COMPARE_THREADS):
    """Run the body with torch's intra-op thread count set to n (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def child_env(threads=COMPARE_THREADS, **extra):
    """The environment of a child process (train.py, torchrun) whose numbers a test compares: the repository on
    PYTHONPATH, OMP_NUM_THREADS pinned (torch reads it for its thread count; torchrun passes a value that is set to
    its workers unchanged), wandb off, and no torchrun variables of an enclosing job."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled", **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def assert_bitwise_equal(a, b):
    """Two state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
