"""
Pretrain a GPT with a chosen positional encoding on llm.c-format token shards (python -m data.fineweb_edu makes them).

    python -m train configs/tiny/rope.toml                                   # one process: CPU or one GPU
    torchrun --standalone --nproc_per_node=8 -m train configs/medium/rope.toml
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:29500 \\
        --rdzv_id=$JOB_ID -m train configs/large/grape_ap.toml --out_dir=/ckpt/large_grape_ap

Run from the repository root as `python -m train ...` (or `torchrun ... -m train ...`).

Any config key can be overridden with --key=value (config.py lists the keys; config.parse_value reads the values).

One optimizer step consumes global_batch_size sequences of block_size tokens, whatever the number of processes:
each of the W processes runs A micro-steps of B sequences, W * A * B = global_batch_size, B the largest divisor of
global_batch_size / W not above micro_batch_size (gradient accumulation; gradients are synchronised on the last
micro-step only); the loss of each micro-step is divided by A, so the update is the gradient of the mean loss over
the global batch. The data loader hands rank r the r-th slice of each global micro-step, so every step sees the
same sequences (1 process x 2 accumulation steps and 2 processes x 1 step alike). The gradient norm is accumulated
in fp64, so DDP and FSDP2 clip identically.

Runs are resumable and pre-emptible: out_dir holds config.json and checkpoints (checkpoint.py); starting a run whose
out_dir has a checkpoint continues from the newest one that verifies (weights, optimizer, step, tokens, data-loader
position, RNG states), bit for bit; a newer damaged checkpoint is named, skipped and kept (checkpoint.py). SIGTERM
or SIGUSR1 saves a checkpoint at the end of the current step and exits with status 0. A non-finite loss stops the
run with status 3 before anything is saved.

Start-up, in this order, before anything is written into out_dir: the config, the world size against the batch, the
memory (the model state, known exactly, against the device's free memory: memory_plan.py), the data (shards present
and readable, the validation tokens < vocab_size); then rank 0 locks out_dir (lockfile.py: a second training into
the same out_dir is refused with the holder's host and pid), checks a config.json already there, and picks the
checkpoint to resume; only then config.json is written. Every rank takes part in each stage's verdict, and in that of
every training batch's token-range check, so an error on any rank stops all of them (none waits in a collective for
a rank that has stopped). Expected errors print `error: ...` and exit with status 2 (errors.py).

Outputs: a log line per log_interval (step, loss, lr, grad norm, tokens/s, MFU, memory, ETA); out_dir/metrics.jsonl
(one JSON object per log or eval event); wandb when enabled (offline mode needs no network).
"""

import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint as ckpt
import mfu
import parallel
from config import ConfigError, check_resume_config, load_config, read_json_file, read_metrics_file, total_steps
from data.loader import LoaderStateError, TokenLoader, ValidationSet
from data.shards import ShardError
from device import autocast_context, resolve_device
from durable import atomic_write_text
from errors import UserError, exit_status
from lockfile import DirectoryLock
from memory_plan import check_fits, gib
from model import GPT

EXIT_NONFINITE = 3


# --------------------------------------------------------------------------------------------------------------------
# Process group (the device and the precision context come from device.py)


class Dist:
    """This process's place in the job: rank, world size, device; single-process when torchrun is not used."""

    def __init__(self, cfg):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = resolve_device(cfg.device, local_rank=self.local_rank if self.enabled else None)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.verdict_group = None
        if self.enabled:
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                    device_id=self.device if self.device.type == "cuda" else None)
            # verdicts (agree) travel over gloo on the CPU: on CUDA one per micro-step would otherwise be an NCCL
            # all-reduce whose .item() waits for the GPU to drain, stalling the queue of kernels every micro-step
            if self.device.type == "cuda":
                self.verdict_group = dist.new_group(backend="gloo")
        self.master = self.rank == 0

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        if self.enabled:
            dist.all_reduce(tensor, op=op)
        return tensor

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def agree(self, stage, what):
        """stage() on every rank, with one verdict for all: if it raises a UserError on any rank, every rank
        raises (that rank its own error, the others a PeerError naming `what`), so that no rank is left waiting
        in a later collective for one that has stopped. Used for each start-up check and for every training batch
        (a token >= vocab_size is found by the rank that reads it). One CPU all-reduce of one number; none when
        single-process. Returns stage()'s result."""
        error, result = None, None
        try:
            result = stage()
        except UserError as e:
            error = e
        if self.enabled:
            failed = torch.tensor([float(error is not None)])
            dist.all_reduce(failed, group=self.verdict_group)
        if error is not None:
            raise error
        if self.enabled and failed.item() > 0:
            raise PeerError(f"another process of this job failed at {what} (its error is above); rank {self.rank} "
                            f"stops too")
        return result

    def close(self):
        if self.enabled:
            dist.destroy_process_group()


class PeerError(UserError):
    """This rank cannot go on because another rank of the job failed a check (Dist.agree)."""


class DataError(UserError):
    """Training data that cannot be used (missing, unreadable, tokens out of range); the message names the file."""


def print0(d, *args):
    if d.master:
        print(*args, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Schedule


def learning_rate(step, cfg):
    """Linear warm-up to learning_rate over warmup_steps, cosine decay to min_lr at lr_decay_steps, then min_lr.
    Step s (0-based) warms up with (s + 1) / warmup_steps; the reference uses s / warmup_steps, i.e. a first update
    with lr 0 (reproduced by reference_loop_quirks)."""
    ramp = step if cfg.reference_loop_quirks else step + 1
    if step < cfg.warmup_steps:
        return cfg.learning_rate * ramp / cfg.warmup_steps
    if step >= cfg.lr_decay_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.lr_decay_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# --------------------------------------------------------------------------------------------------------------------
# Model wrapping and state


def build_model(cfg, d):
    """(the GPT, the module to train: the GPT with activation checkpointing, compile, FSDP2 or DDP, parallel.py)."""
    torch.manual_seed(cfg.seed)  # identical init on every rank (FSDP2 shards it; DDP would broadcast it anyway)
    with torch.device(d.device):
        raw = GPT(cfg.model)
    return raw, parallel.wrap(raw, cfg, d.device, d.enabled)


def set_grad_sync(model, cfg, enabled):
    """Synchronise gradients only on the last micro-step of an accumulation."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif cfg.fsdp:
        model.set_requires_gradient_sync(enabled)


def micro_batch_for(cfg, world):
    """(micro-batch, accumulation steps) with world * micro * accum = global_batch_size: the largest micro-batch
    <= cfg.micro_batch_size that divides the per-process share, so every world size that divides the global batch
    follows the same optimisation (480 sequences: 1, 2, 4, 8, 16, 32 (15 x 1), 48, 60, ... GPUs)."""
    share, rem = divmod(cfg.global_batch_size, world)
    if rem:
        raise ConfigError(f"global_batch_size={cfg.global_batch_size} is not divisible by the world size {world}; "
                          f"use a number of processes that divides it, or another global_batch_size")
    micro = max(b for b in range(1, min(cfg.micro_batch_size, share) + 1) if share % b == 0)
    return micro, share // micro


def loss_multiplier(cfg, accum):
    """What each micro-step's mean loss is multiplied by before backward. Default 1 / accum: the update is the
    gradient of the mean loss over the global batch. reference_loop_quirks: the reference sums its micro-step
    gradients without dividing, on 8 GPUs with micro_batch_size sequences each, i.e. its gradient is
    global_batch_size / (8 * micro_batch_size) (3 medium, 4 large) times the mean gradient, whatever the world size
    here."""
    if cfg.reference_loop_quirks:
        return cfg.global_batch_size / (8 * cfg.micro_batch_size) / accum
    return 1.0 / accum


@torch.no_grad()
def clip_grad_norm(params, max_norm):
    """The global L2 norm of the gradients, accumulated in fp64, and clipping to max_norm (0: no clipping). An fp32
    sum over the millions of entries of the embedding's gradient rounds at ~1e-5 relative, and differently for DDP's
    full gradients and FSDP's shards; through the clip coefficient and Adam's per-coordinate normalisation that
    difference would reach the weights. In fp64 both give the same fp32 coefficient."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g, 2, dtype=torch.float64) for g in grads]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]  # FSDP2: DTensor shards
    total = torch.linalg.vector_norm(torch.stack(norms), 2)
    if max_norm > 0:
        coef = min(1.0, max_norm / (total.item() + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total


def state_dicts(raw, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(raw, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_state_dicts(raw, optimizer, model_state, optim_state):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(raw, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def save(d, cfg, step, tokens, raw, optimizer, loader, reason):
    """Write an atomic checkpoint of the state *after* `step` updates (collective: every rank calls it)."""
    model_state, optim_state = state_dicts(raw, optimizer)
    if d.master:
        tmp = ckpt.prepare_staging(cfg.out_dir, step)
    d.barrier()
    tmp = ckpt.staging_dir(cfg.out_dir, step)
    ckpt.write_rank_files(tmp, d.rank)
    if d.master:
        meta = dict(step=step, tokens=tokens, loader=loader.state_dict(), config=cfg.resolved_dict(),
                    git=ckpt.git_revision(), world_size=d.world, environment=ckpt.environment(d.world, d.device),
                    reason=reason, time=time.time())
        ckpt.write_main_files(tmp, model_state, optim_state, meta)
    d.barrier()
    if d.master:
        path = ckpt.publish(cfg.out_dir, step)
        ckpt.prune(cfg.out_dir, cfg.keep_last, cfg.keep_every)
        print(f"saved {path} ({reason})", flush=True)
    d.barrier()


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, val, cfg, d, amp, micro_batch):
    """Mean token loss over the fixed validation budget, identical for any world size (sum and count all-reduced).
    model: the module without its DDP wrapper (DDP's forward would broadcast buffers, a collective that ranks with
    fewer validation batches would not join); FSDP's module is sharded and every rank runs the same number of
    (padded) batches."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    for x, y in val.batches(micro_batch, d.rank, d.world, d.device, pad=cfg.fsdp):
        with amp:
            logits, _ = model(x, y)
        total[0] += F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=-1,
                                    reduction="sum").double()
        total[1] += (y != -1).sum()
    d.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


# --------------------------------------------------------------------------------------------------------------------
# Logging


def write_json_lines(file, records):
    """One JSON object per line (metrics.jsonl's format)."""
    file.writelines(json.dumps(record) + "\n" for record in records)


class Metrics:
    """metrics.jsonl (append, rank 0) and wandb (when enabled). A run resumed at step s after a crash re-runs the
    steps after s: their earlier records move to metrics_discarded.jsonl (appended, nothing is lost), so that
    metrics.jsonl holds each step once, in order, as the checkpoints saw it."""

    def __init__(self, cfg, d, resumed_step):
        self.d, self.wandb = d, None
        self.path = Path(cfg.out_dir) / "metrics.jsonl"
        if not d.master:
            return
        self._discard_after(resumed_step)
        self.write(dict(event="start", step=resumed_step, world_size=d.world, git=ckpt.git_revision()))
        if cfg.wandb != "disabled":
            import wandb
            id_file = Path(cfg.out_dir) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or Path(cfg.out_dir).name,
                                    id=run_id, resume="allow", mode=cfg.wandb, dir=cfg.out_dir,
                                    config=cfg.resolved_dict())

    def _discard_after(self, step):
        """Move the records of steps after `step` to metrics_discarded.jsonl; a torn last line (a crash or a full
        disk mid-write) is dropped with a warning (read_metrics_file), and the file then rewritten so that the next
        record starts on a line of its own."""
        if not self.path.is_file():
            return
        records, intact = read_metrics_file(self.path)
        keep = [r for r in records if r.get("step", 0) <= step]
        later = [r for r in records if r.get("step", 0) > step]
        if later:
            with open(self.path.with_name("metrics_discarded.jsonl"), "a") as f:
                write_json_lines(f, later)
        if later or not intact:
            tmp = self.path.with_suffix(".jsonl.tmp")
            with open(tmp, "w") as f:
                write_json_lines(f, keep)
            os.replace(tmp, self.path)

    def write(self, record):
        if not self.d.master:
            return
        with open(self.path, "a") as f:
            write_json_lines(f, [record])
        if self.wandb is not None and "step" in record:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                           step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def memory_source(device):
    """What memory_mb measures on `device`."""
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process, runtime included"


def memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def format_eta(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


# --------------------------------------------------------------------------------------------------------------------
# Main loop


class StopSignal:
    """SIGTERM / SIGUSR1 (cluster pre-emption): finish the current step, checkpoint, exit cleanly."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name


def train(cfg):
    d = Dist(cfg)
    try:
        return _train(cfg, d)
    finally:
        d.close()


def open_data(cfg, d, micro_batch):
    """The training loader and the validation set: shards present and readable, the validation tokens range-checked
    against vocab_size (the training tokens are checked batch by batch, data/loader.py)."""
    try:
        loader = TokenLoader(cfg.data_dir, seq_len=cfg.model.block_size, batch_size=micro_batch, rank=d.rank,
                             world_size=d.world, seed=cfg.data_seed, vocab_size=cfg.model.vocab_size,
                             document_aligned=cfg.document_aligned, device=d.device)
        val = ValidationSet(cfg.data_dir, seq_len=cfg.model.block_size, num_tokens=cfg.val_tokens,
                            vocab_size=cfg.model.vocab_size)
    except (ShardError, LoaderStateError) as e:
        raise as_data_error(e, cfg) from None
    return loader, val


def as_data_error(e, cfg):
    """A data module's error as a UserError (those not yet derived from errors.UserError), naming data_dir."""
    return e if isinstance(e, UserError) else DataError(f"data_dir {cfg.data_dir!r}: {e}")


def lock_out_dir(cfg, d):
    """Rank 0: hold out_dir's lock for the whole run (released by the caller); other ranks: None."""
    if not d.master:
        return None
    return DirectoryLock(cfg.out_dir, "training").acquire()


def check_run_directory(cfg, d):
    """The checkpoint to resume from (a checkpoint.ResumeState, or None for a new run), after checking that out_dir's
    config.json, if any, is readable and compatible with cfg. Writes nothing."""
    out_dir = Path(cfg.out_dir)
    config_file = out_dir / "config.json"
    if config_file.exists():
        check_resume_config(read_json_file(config_file, "the run's config"), cfg, str(out_dir))
    resume = ckpt.newest_resumable(out_dir, d.rank, d.world, report=lambda line: print0(d, line))
    if resume is not None:
        check_resume_config(resume.meta["config"], cfg, str(resume.path))
    return resume


def agree_on_checkpoint(d, resume, out_dir):
    """The same checkpoint on every rank: the oldest of the ranks' choices (a file that only some ranks can read
    makes them choose differently), reloaded on the ranks that chose a newer one."""
    mine = -1 if resume is None else resume.meta["step"]
    agreed = int(d.all_reduce(torch.tensor([mine], device=d.device), op=dist.ReduceOp.MIN).item())
    if agreed == mine:
        return resume
    return ckpt.newest_resumable(out_dir, d.rank, d.world, at_most=agreed, report=lambda line: None)


def write_run_config(cfg, d):
    """Rank 0: out_dir/config.json, the resolved config (atomically: a crash leaves the old one or the new one)."""
    if d.master:
        atomic_write_text(Path(cfg.out_dir) / "config.json", json.dumps(cfg.resolved_dict(), indent=1,
                                                                            sort_keys=True))


def restore(d, raw, optimizer, loader, resume):
    """Load a checkpoint's states into the model, optimizer, loader and RNGs; (step, tokens) it had reached."""
    load_state_dicts(raw, optimizer, resume.model_state, resume.optimizer_state)
    try:
        loader.load_state_dict(resume.meta["loader"])
    except (ShardError, LoaderStateError) as e:
        raise ckpt.CheckpointError(f"checkpoint {resume.path}: its data-loader state does not fit the data: {e}") \
            from None
    if resume.rng is not None:
        ckpt.set_rng_state(resume.rng)
    step, tokens = resume.meta["step"], resume.meta["tokens"]
    print0(d, f"resumed from {resume.path} at step {step} ({tokens:,} tokens)")
    changed = ckpt.environment_changes(resume.meta, ckpt.environment(d.world, d.device))
    if changed:
        print0(d, f"warning: resuming with {', '.join(changed)}: the run continues the same optimisation (state, "
                  f"data order), but not bit for bit as an uninterrupted run would (that needs the same world "
                  f"size, device, thread count and torch build)")
    elif d.device.type == "cuda":
        print0(d, "same world size, GPU, CUDA and torch build as the run that saved: the continuation equals an "
                  "uninterrupted run as far as the CUDA kernels are deterministic")
    else:
        print0(d, "same world size, CPU, thread count and torch build as the run that saved: the continuation is "
                  "bit for bit what an uninterrupted run computes")
    return step, tokens


def _train(cfg, d):
    with contextlib.ExitStack() as held:
        return _train_locked(cfg, d, held)


def _train_locked(cfg, d, held):
    out_dir = Path(cfg.out_dir)
    micro_batch, accum = d.agree(lambda: micro_batch_for(cfg, d.world), "the batch-size check")
    memory_line, memory_estimate = d.agree(lambda: check_fits(cfg, d.device, d.world, micro_batch), "the memory check")
    print0(d, memory_line)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast_context(d.device, cfg.dtype)

    # ---- everything that can fail is checked before out_dir is written; then config.json records the run
    loader, val = d.agree(lambda: open_data(cfg, d, micro_batch), "opening the data")
    lock = d.agree(lambda: lock_out_dir(cfg, d), f"locking {out_dir}")
    if lock is not None:
        held.callback(lock.release)
    resume = d.agree(lambda: check_run_directory(cfg, d), f"checking {out_dir}")
    resume = agree_on_checkpoint(d, resume, out_dir) if d.enabled else resume
    write_run_config(cfg, d)

    raw, model = build_model(cfg, d)
    optimizer = torch.optim.AdamW(raw.optimizer_param_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                                  fused=d.device.type == "cuda" and not cfg.fsdp)
    T = cfg.model.block_size

    step, tokens = 0, 0
    if resume is not None:
        step, tokens = restore(d, raw, optimizer, loader, resume)
        del resume  # the loaded states: freed before training
    n_steps = total_steps(cfg)
    if step >= n_steps:
        print0(d, f"{out_dir} is finished ({step} of {n_steps} steps); nothing to do")
        return dict(step=step, finished=True)

    metrics = Metrics(cfg, d, step)
    stop = StopSignal()
    n_params = raw.num_params()
    shape = (n_params, cfg.model.n_layer, cfg.model.n_head, cfg.model.head_dim, T)
    flops_per_token = mfu.flops_per_token(*shape)
    peak, peak_source = mfu.device_peak(d.device, cfg.peak_flops)
    tokens_per_step = cfg.global_batch_size * T
    print0(d, f"{cfg.model.pos_encoding}{' + kv_shift' if cfg.model.kv_shift else ''}: {n_params:,} parameters, "
              f"{d.world} process(es) x {accum} micro-steps x {micro_batch} x {T} tokens = "
              f"{tokens_per_step:,} tokens/step, {n_steps} steps, device {d.device}")
    print0(d, f"MFU: {mfu.formula(*shape)}; peak " +
              (f"{peak / 1e12:,.0f} TFLOP/s per device ({peak_source})" if peak else f"unknown ({peak_source}): n/a"))

    loss_scale = loss_multiplier(cfg, accum)
    eval_model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    model.train()
    t_log, steps_since_log, t_start, start_step = time.time(), 0, time.time(), step
    last_val, peak_reported = None, False
    while step < n_steps:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = d.agree(loader.next_batch, f"reading the training data at step {step}")
            set_grad_sync(model, cfg, micro == accum - 1)
            with amp:
                _, loss = model(x, y)
            loss_sum += loss.detach()
            (loss * loss_scale).backward()
        grad_norm = clip_grad_norm(list(raw.parameters()), cfg.grad_clip)
        # one collective per step: the mean loss, and whether any rank saw a stop signal
        flags = torch.stack([loss_sum / accum, torch.tensor(float(stop.received is not None), device=d.device)])
        d.all_reduce(flags)
        mean_loss = flags[0].item() / d.world
        if not math.isfinite(mean_loss) or not math.isfinite(grad_norm.item()):
            print0(d, f"error: non-finite loss {mean_loss} or grad norm {grad_norm.item()} at step {step}; stopping "
                      f"without saving (the last good checkpoint is kept). Lower the learning rate or check the data.")
            metrics.write(dict(event="nonfinite", step=step, loss=mean_loss))
            metrics.close()
            sys.exit(EXIT_NONFINITE)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        steps_since_log += 1

        last = step == n_steps
        if step % cfg.log_interval == 0 or last:
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            tok_s = steps_since_log * tokens_per_step / (now - t_log)
            step_mfu = mfu.utilisation(tok_s / d.world, flops_per_token, peak)
            eta = (now - t_start) / max(1, step - start_step) * (n_steps - step)
            mem = memory_mb(d.device)
            if not peak_reported:  # once, at the first log line: the measured peak beside the start-up estimate
                peak_reported = True
                print0(d, f"memory: peak {mem / 1024:,.2f} GiB measured ({memory_source(d.device)}), "
                          f"{gib(memory_estimate.peak)} estimated")
            print0(d, f"step {step}/{n_steps} | loss {mean_loss:.4f} | lr {lr:.2e} | gnorm {grad_norm.item():.3f} | "
                      f"{tok_s:,.0f} tok/s | mfu {mfu.percent(step_mfu)} | mem {mem:,.0f}MB | eta {format_eta(eta)}")
            metrics.write(dict(event="train", step=step, tokens=tokens, loss=mean_loss, lr=lr,
                               grad_norm=grad_norm.item(), tokens_per_s=tok_s, mfu=step_mfu, memory_mb=mem))
            t_log, steps_since_log = time.time(), 0
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or last:
            last_val = evaluate(eval_model, val, cfg, d, amp, micro_batch)
            print0(d, f"step {step}/{n_steps} | val loss {last_val:.4f} ({val.num_tokens:,} tokens)")
            metrics.write(dict(event="val", step=step, tokens=tokens, val_loss=last_val))
        signalled = flags[1].item() > 0
        if step % cfg.checkpoint_interval == 0 or last or signalled:
            reason = "final" if last else f"signal {stop.received or 'on another rank'}" if signalled else "periodic"
            save(d, cfg, step, tokens, raw, optimizer, loader, reason=reason)
        if signalled and not last:
            print0(d, f"stopping at step {step} after a pre-emption signal; rerun the same command to resume")
            metrics.close()
            return dict(step=step, finished=False, val_loss=last_val)
    metrics.close()
    return dict(step=step, finished=True, val_loss=last_val)


def run_command(argv):
    """train.py's command line: [config.toml] [--key=value ...]; exit status 0 (done or pre-empted)."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    path = argv[0] if argv and not argv[0].startswith("--") else None
    cfg = load_config(path, argv[1:] if path else argv)
    try:
        train(cfg)
    except (ShardError, LoaderStateError) as e:  # raised by the loader mid-run (e.g. a token >= vocab_size)
        raise as_data_error(e, cfg) from None
    return 0


def main(argv=None):
    """Expected errors (config, data, a busy out_dir, no checkpoint that verifies) print `error: ...` and exit 2."""
    return exit_status(run_command, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
