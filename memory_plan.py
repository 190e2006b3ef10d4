"""
The memory a training process needs, estimated before it starts, the memory its device has, and the start-up check
between the two (train.py runs it before anything is written into out_dir; scripts/plan.py prints it for a cluster).

Model state per process, in bytes, for N parameters in n_tensors tensors (fp32 weights; mixed precision is autocast,
which keeps no second copy of the weights):
    weights 4 N + gradients 4 N + AdamW's two moments 8 N + AdamW's step counter 4 per tensor
    DDP adds its gradient buckets, a second copy of the gradients: + 4 N
    FSDP2 shards weights, gradients and moments over the W processes and gathers one block's full weights at a
    time, in fsdp_param_dtype (g bytes each: 4 fp32, 2 bf16): 16 N / W + 4 per tensor + g x (the largest block's
    parameters), the gathered block counted once (prefetching the next one can double that term; the padding of
    each tensor to a multiple of W rows is ignored).
One process and DDP: exact for the tensors named (tests/test_memory_plan.py measures them).

Activations of one micro-batch of B sequences of T tokens (what autograd keeps from the forward for the backward):
    a block      measured, not modelled: one block of the config (its width, heads, encoding, KV-shift, attention
                 path) runs forward on the CPU at B in {1, 2} and T in {T0, 2 T0}, counting the distinct storages its
                 saved tensors hold (parameters excluded, their autocast copies included), which fixes
                 bytes(B, T) = B T a + T b + c exactly (every saved tensor is per token, per position or fixed);
                 in bf16 the CPU's autocast stands in for CUDA's (the same ops run in bf16: linear layers, SDPA)
    checkpointed a block under activation checkpointing keeps only its fp32 input, 4 C per token, and one block's
                 activations exist again while its backward runs
    the head     the final norm and LM head: 4 (3C + 1) + 4V + 8 bytes per token in fp32, 4 (2C + 1) + 2C + 4V + 8
                 in bf16 (fp32 logits either way) plus the bf16 copy of the tied embedding, 2 V C
Transients on top of the saved activations, at the two peaks of a backward:
    the loss     the cross-entropy backward holds three more (B, T, V) fp32 tensors (measured on the CPU; plus the
                 bf16 gradient of the logits, 2 V per token, in bf16) while every block's activations still exist
    a block      the chunked attention's backward work buffers, four (B, H, min(chunk, T), T) fp32 tensors, when the
                 encoding is additive
Peak = model state + saved activations + the larger transient. The block is measured eager: under compile=true,
inductor's partitioner usually saves fewer tensors (norms and activations fused and recomputed), so the estimate is
then usually high. Not counted: the runtime (the CUDA context and
kernel workspaces, ~0.5-1 GiB per GPU; ~0.1 GiB of libraries and caches on a CPU), allocator fragmentation, the
validation pass (no grad: smaller). tests/test_memory_plan.py compares the estimate with the peak resident memory of
CPU trainings (results in results/plan_vs_measured.md); on a GPU it is an estimate until measured there.

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
    """The run cannot fit the memory its device has."""


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


def model_state_terms(shape, world=1, fsdp=False, ddp=None, gathered_bytes=4):
    """{"weights", "gradients", "optimizer"}: bytes per process (the formulas of the module docstring; DDP's buckets
    count as gradients, FSDP2's gathered block as weights); ddp defaults to world > 1 without fsdp; gathered_bytes:
    FSDP2's bytes per gathered parameter."""
    ddp = world > 1 and not fsdp if ddp is None else ddp
    if fsdp:
        shard = shape.params // world
        return dict(weights=4 * shard + gathered_bytes * shape.largest_block, gradients=4 * shard,
                    optimizer=8 * shard + 4 * shape.tensors)
    return dict(weights=4 * shape.params, gradients=4 * shape.params * (2 if ddp else 1),
                optimizer=8 * shape.params + 4 * shape.tensors)


def model_state_bytes(shape, world=1, fsdp=False, ddp=None, gathered_bytes=4):
    """The sum of model_state_terms."""
    return sum(model_state_terms(shape, world, fsdp, ddp, gathered_bytes).values())


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


# ---------------------------------------------------------------------------------------------------- activations

T0 = 64  # the block is measured at T0 and 2 T0 tokens: one query block of the chunked path, milliseconds on a CPU


@dataclass(frozen=True)
class BlockCost:
    """Saved bytes of one block for B sequences of T tokens: B T per_token + T per_position + fixed."""
    per_token: int
    per_position: int
    fixed: int

    def bytes(self, batch, T):
        return batch * T * self.per_token + T * self.per_position + self.fixed


def _saved_bytes(run, exclude):
    """Bytes of the distinct storages autograd saves while run() executes, those in `exclude` (parameters) aside."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def measure_block(model_config, bf16):
    """The BlockCost of one block of this config (the chunked path for an additive encoding), measured on the CPU
    with the CPU's autocast standing in for CUDA's when bf16 (module docstring)."""
    from dataclasses import replace

    from model import Block
    cfg = replace(model_config, attn_impl="chunked")
    torch.manual_seed(0)
    with torch.device("cpu"):
        block = Block(cfg)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def saved(batch, T):
        x = torch.randn(batch, T, cfg.n_embd, requires_grad=True)
        positions = torch.arange(T)
        with cast:
            return _saved_bytes(lambda: block(x, positions), params)

    one, two, long = saved(1, T0), saved(2, T0), saved(1, 2 * T0)
    per_token = (two - one) // T0
    per_position = (long - one) // T0 - per_token
    return BlockCost(per_token, per_position, one - T0 * (per_token + per_position))


@dataclass(frozen=True)
class Estimate:
    """Bytes per process for one micro-batch (module docstring): state + saved + max(loss_transient, block_transient)."""
    micro_batch: int
    state: int
    saved: int
    state_terms: dict
    loss_transient: int
    block_transient: int

    @property
    def activations(self):
        return self.saved + max(self.loss_transient, self.block_transient)

    @property
    def peak(self):
        return self.state + self.activations


def bf16_compute(cfg, device_type):
    """Whether the run's matmuls are bf16 (its dtype on that device type)."""
    from device import compute_dtype
    return compute_dtype(torch.device(device_type), cfg.dtype) == torch.bfloat16


def estimate(cfg, world, micro_batch, device_type, block=None, shape=None):
    """The Estimate for the TrainConfig cfg with `world` processes and `micro_batch` sequences per micro-step on a
    device of `device_type` ("cuda", "cpu"); block / shape: a measured BlockCost and ModelShape to reuse."""
    from parallel import checkpointed_blocks, fsdp_param_dtype
    m = cfg.model
    bf16 = bf16_compute(cfg, device_type)
    block = block or measure_block(m, bf16)
    shape = shape or model_shape(m)
    B, T, C, V = micro_batch, m.block_size, m.n_embd, m.vocab_size
    tokens = B * T
    gathered = fsdp_param_dtype(cfg, torch.device(device_type)).itemsize if cfg.fsdp else 4
    terms = model_state_terms(shape, world, cfg.fsdp, gathered_bytes=gathered)
    state = sum(terms.values())
    checkpointed = len(checkpointed_blocks(m.n_layer, cfg.activation_checkpointing))
    one_block = block.bytes(B, T)
    saved = (m.n_layer - checkpointed) * one_block + checkpointed * 4 * C * tokens
    if bf16:
        saved += tokens * (4 * (2 * C + 1) + 2 * C + 4 * V + 8) + 2 * V * C
    else:
        saved += tokens * (4 * (3 * C + 1) + 4 * V + 8)
    loss_transient = tokens * (12 * V + (2 * V if bf16 else 0))
    additive = split_additive(m.pos_encoding)
    work = 4 * 4 * B * m.n_head * min(m.attn_chunk_size, T) * T if additive else 0
    return Estimate(B, state, saved, terms, loss_transient, (one_block if checkpointed else 0) + work)


def split_additive(pos_encoding):
    """Whether pos_encoding names an additive PE (alone or in a composition)."""
    from model import split_pos_encoding
    return split_pos_encoding(pos_encoding)[1] is not None


def largest_micro_batch(cfg, world, device_type, memory, candidates):
    """(the largest micro-batch among `candidates` whose Estimate's peak fits `memory` bytes or None, the Estimates
    by micro-batch); the block is measured once."""
    m = cfg.model
    block, shape = measure_block(m, bf16_compute(cfg, device_type)), model_shape(m)
    plans = {b: estimate(cfg, world, b, device_type, block, shape) for b in candidates}
    fitting = [b for b, plan in plans.items() if plan.peak <= memory]
    return (max(fitting) if fitting else None), plans


def gib(n):
    """A byte count for people: GiB with two decimals, MiB below 1 GiB."""
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / 2 ** 20:,.1f} MiB"


def check_fits(cfg, device, world, micro_batch):
    """The start-up lines to print for the TrainConfig cfg on `device` with `world` processes and `micro_batch`
    sequences per micro-step, and the Estimate; raises MemoryPlanError naming the numbers when the model state alone,
    or (memory_check = "refuse") the estimated peak, exceeds the memory the device has."""
    plan = estimate(cfg, world, micro_batch, device.type)
    have, source = available_bytes(device)
    layout = (f"FSDP2 over {world} processes" if cfg.fsdp else f"DDP over {world} processes" if world > 1
              else "one process")
    state = (f"model state {gib(plan.state)} per process ({model_shape(cfg.model).params:,} parameters: fp32 "
             f"weights, gradients and AdamW moments, {layout})")
    detail = (f"estimated peak {gib(plan.peak)} = {state} + activations {gib(plan.activations)} (micro-batch "
              f"{micro_batch} x {cfg.model.block_size} tokens, activation_checkpointing="
              f"{cfg.activation_checkpointing})")
    if have is None:
        return f"memory: {detail}; device memory {source}, not checked", plan
    if plan.state > have:
        hint = "use fsdp=true over more GPUs" if device.type == "cuda" else "use a smaller model or more memory"
        raise MemoryPlanError(f"the {state} exceeds the {gib(have)} {source}, before any activation; {hint}")
    if plan.peak > have and cfg.memory_check == "refuse":
        raise MemoryPlanError(f"the {detail} exceeds the {gib(have)} {source}; lower micro_batch_size (the "
                              f"accumulation adapts), set activation_checkpointing=full, or memory_check=warn to "
                              f"start anyway (the estimate is within 15% on the CPU trainings it is tested on)")
    verdict = "exceeds" if plan.peak > have else "of"
    return f"memory: {detail} {verdict} {gib(have)} {source}", plan
