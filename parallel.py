"""
How train.py readies the model for its processes, in the order torchtitan applies the same steps:

    1. activation checkpointing on the chosen blocks (activation_checkpointing: "none", "full" = every block, or an
       int k = blocks 0, k, 2k, ...): a checkpointed block keeps only its input for the backward and recomputes its
       forward there (torch.distributed's composable `checkpoint`, non-reentrant, which leaves parameter names and so
       checkpoints unchanged; the chunked attention's autograd Function is recomputed with the rest of the block,
       and nothing in a block draws random numbers, so the recomputation is exact);
    2. torch.compile of each block (compile=true), before sharding, so that FSDP2's hooks stay outside the graphs
       and every block reuses one compiled graph (the model's embedding, final norm and head stay eager);
    3. FSDP2 (fsdp=true): fully_shard on each block, then on the whole model (the tied embedding / head and the final
       norm), with a MixedPrecisionPolicy: parameters all-gathered and computed in fsdp_param_dtype, gradients
       reduce-scattered in fsdp_reduce_dtype (auto: the run's compute dtype (bf16 on CUDA) for the parameters, fp32
       for the reduction), each block resharded after its forward unless fsdp_reshard_after_forward is false (the
       last block's never is: its backward comes next);
       or DDP when several processes run without FSDP2.
The master weights and the AdamW state stay fp32 in every layout.
"""

import torch
from torch.distributed._composable import checkpoint

from device import compute_dtype


def checkpointed_blocks(n_layer, setting):
    """The indices of the blocks activation checkpointing applies to (setting validated by config.validate)."""
    if setting == "none":
        return []
    every = 1 if setting == "full" else int(setting)
    return list(range(0, n_layer, every))


def fsdp_param_dtype(cfg, device):
    """The dtype FSDP2 gathers and computes parameters in (fsdp_param_dtype; auto: the run's compute dtype)."""
    setting = cfg.dtype if cfg.fsdp_param_dtype == "auto" else cfg.fsdp_param_dtype
    return compute_dtype(device, setting)


def fsdp_policy(cfg, device):
    """The MixedPrecisionPolicy for cfg's fsdp_param_dtype / fsdp_reduce_dtype on `device`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    reduce = torch.float32 if cfg.fsdp_reduce_dtype == "auto" else getattr(torch, cfg.fsdp_reduce_dtype)
    return MixedPrecisionPolicy(param_dtype=fsdp_param_dtype(cfg, device), reduce_dtype=reduce)


def wrap(raw, cfg, device, distributed):
    """The module to train for the GPT `raw` (changed in place: checkpointing, compile and FSDP2 act on its
    blocks; `raw` keeps its parameter names, so its state dicts and checkpoints do not depend on these settings)."""
    blocks = raw.transformer.h
    for i in checkpointed_blocks(len(blocks), cfg.activation_checkpointing):
        checkpoint(blocks[i])
    if cfg.compile:
        for block in blocks:
            block.compile()
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard
        policy = fsdp_policy(cfg, device)
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            fully_shard(block, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward and not last)
        fully_shard(raw, mp_policy=policy)
        return raw
    if distributed:
        return torch.nn.parallel.DistributedDataParallel(
            raw, device_ids=[device.index] if device.type == "cuda" else None)
    return raw
