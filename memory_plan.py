"""
The memory a training process needs that is known before it starts (the model state), the memory its device has,
and the start-up check between the two (train.py runs it before anything is written into out_dir).

Model state per process, in bytes, for N parameters in n_tensors tensors (fp32 weights; mixed precision is autocast,
which keeps no second copy of the weights):
    weights 4 N + gradients 4 N + AdamW's two moments 8 N + AdamW's step counter 4 per tensor
    DDP adds its gradient buckets, a second copy of the gradients: + 4 N
    FSDP2 shards weights, gradients and moments over the W processes and gathers one block's full weights at a
    time, in fsdp_param_dtype (g bytes each: 4 fp32, 2 bf16): 16 N / W + 4 per tensor + g x (the largest block's
    parameters), the gathered block counted once
    (prefetching the next one can double that term; the padding of each tensor to a multiple of W rows is ignored).
One process and DDP: exact for the tensors named (tests/test_memory_plan.py measures them). Every layout: a lower
bound for the process:
activations, the bf16 weight casts autocast caches during a forward, the attention path's work buffers, the
allocator's fragmentation and the CUDA context come on top and depend on the micro-batch and the encoding. So a run
whose model state alone exceeds the device's free memory is refused (it cannot start); a run that passes may still
run out of memory in its activations.

Device memory: CUDA, the free memory that torch.cuda.mem_get_info reports at start-up (other processes' use
already subtracted); CPU, the host's MemAvailable (/proc/meminfo) shared by the LOCAL_WORLD_SIZE processes of this
host; elsewhere unknown, and nothing is checked.
"""

import os
from dataclasses import dataclass

import torch

from errors import UserError

GiB = 1024 ** 3


class MemoryPlanError(UserError):
    """The run's model state cannot fit the memory its device has."""


@dataclass(frozen=True)
class ModelShape:
    params: int  # N, the tied embedding counted once
    tensors: int
    largest_block: int  # parameters of the largest transformer block


def model_shape(model_config):
    """The parameter counts of a GPT for this config, built on the meta device (nothing is allocated)."""
    from model import GPT
    with torch.device("meta"):
        model = GPT(model_config)
    params = list(model.parameters())
    largest = max(sum(p.numel() for p in block.parameters()) for block in model.transformer.h)
    return ModelShape(sum(p.numel() for p in params), len(params), largest)


def model_state_bytes(shape, world=1, fsdp=False, ddp=None, gathered_bytes=4):
    """Bytes of weights, gradients and AdamW state per process (the formulas of the module docstring); ddp defaults
    to world > 1 without fsdp; gathered_bytes: FSDP2's bytes per gathered parameter."""
    ddp = world > 1 and not fsdp if ddp is None else ddp
    if fsdp:
        return 16 * shape.params // world + 4 * shape.tensors + gathered_bytes * shape.largest_block
    return 16 * shape.params + 4 * shape.tensors + (4 * shape.params if ddp else 0)


def available_bytes(device):
    """(bytes this process may use or None, where the figure comes from)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({total / GiB:,.1f} GiB total)"
    if device.type == "cpu":
        available = _meminfo_available()
        if available is None:
            return None, "host memory unknown (no MemAvailable in /proc/meminfo)"
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        share = f", shared by {local} processes" if local > 1 else ""
        return available // local, f"available on this host (MemAvailable{share})"
    return None, f"unknown for device type {device.type}"


def _meminfo_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def check_model_state_fits(cfg, device, world):
    """The start-up line to print for the TrainConfig cfg on `device` with `world` processes; raises
    MemoryPlanError, naming the numbers, when the model state alone exceeds the memory the device has."""
    from parallel import fsdp_param_dtype
    shape = model_shape(cfg.model)
    fsdp = cfg.fsdp
    gathered = fsdp_param_dtype(cfg, device).itemsize if fsdp else 4
    need = model_state_bytes(shape, world, fsdp, gathered_bytes=gathered)
    have, source = available_bytes(device)
    layout = (f"FSDP2 over {world} processes" if fsdp else f"DDP over {world} processes" if world > 1
              else "one process")
    what = (f"model state {need / GiB:,.2f} GiB per process ({shape.params:,} parameters: fp32 weights, gradients "
            f"and AdamW moments, {layout})")
    if have is None:
        return f"memory: {what}; device memory {source}, not checked"
    if need > have:
        hint = "use fsdp=true over more GPUs" if device.type == "cuda" else "use a smaller model or more memory"
        raise MemoryPlanError(f"the {what} exceeds the {have / GiB:,.2f} GiB {source}, before any activation; {hint}")
    return f"memory: {what} of {have / GiB:,.2f} GiB {source}; activations come on top"
