"""
Where a computation runs and in which precision: the one place that turns a `device` and a `dtype` setting (the
training config keys of the same names, the evaluation commands' --device and --dtype) into a torch device and an
autocast context.

    resolve_device("auto")                 cuda if this machine has CUDA, else cpu
    resolve_device("cuda", local_rank=3)   cuda:3: under torchrun every process takes the GPU of its local rank
    autocast_context(device, "auto")       bfloat16 autocast on CUDA; on other devices nothing (fp32)

Precision: float32 computes everything in fp32; bfloat16 autocasts the matmuls to bf16 (model.py keeps norms, PE
math and logits in fp32 either way); auto is bfloat16 on CUDA and float32 on other devices. A setting that cannot
be used (an unknown dtype, a CUDA device on a machine without CUDA) is a DeviceError naming it.
"""

from contextlib import nullcontext

import torch

from errors import UserError

DTYPES = ("auto", "bfloat16", "float32")


class DeviceError(UserError, ValueError):
    """A device or dtype setting that cannot be used here; the message names the setting and what is allowed."""


def resolve_device(name="auto", local_rank=None):
    """The torch device for `name`: auto, cpu, cuda, cuda:N or any other torch device string. A CUDA device gets
    an index: local_rank when given (a torchrun process's GPU, whatever N says), else N, else 0."""
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {name!r} is not a torch device ({e}); expected auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(name)!r} requested but CUDA is not available on this machine")
    return torch.device("cuda", local_rank if local_rank is not None else device.index or 0)


def compute_dtype(device, dtype="auto"):
    """The torch dtype the matmuls of a computation on `device` run in for the setting `dtype` (one of DTYPES)."""
    if dtype not in DTYPES:
        raise DeviceError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, dtype)


def autocast_context(device, dtype="auto"):
    """The precision context for computing on `device` (a torch device or its name) in `dtype` (one of DTYPES).
    The returned object can be entered again after it exits, so one context serves a whole run."""
    device = torch.device(device)
    if compute_dtype(device, dtype) == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
