"""
Checkpoints: atomic, complete, discoverable, pruned.

Layout of one checkpoint (a directory under the run's out_dir):

    out_dir/ckpt_0001000/
        model.pt          full (unsharded) model state dict, fp32, written by rank 0
        optimizer.pt      full optimizer state dict keyed by parameter name (portable across DDP/FSDP/world sizes)
        meta.json         step, tokens seen, data-loader state, resolved config, git revision, world size, and
                          the environment a bitwise continuation depends on (`environment`)
        rng_rank{r}.pt    each rank's python/numpy/torch(/cuda) RNG states

Atomicity: everything is written into `out_dir/.tmp_ckpt_0001000/`, flushed and fsync'ed; then rank 0 renames the
directory to its final name (one rename, atomic on POSIX file systems). A directory named `ckpt_*` is therefore
always complete; a crash mid-write leaves only a `.tmp_*` directory, which the next save of that step replaces and
which is never loaded. Pruning runs after the rename, so the newest complete checkpoint is never deleted.
"""

import json
import os
import platform
import random
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")


def checkpoint_name(step):
    return f"ckpt_{step:07d}"


def list_checkpoints(out_dir):
    """[(step, path)] of the complete checkpoints in out_dir, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return sorted(found)


def latest_checkpoint(out_dir):
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _fsync_tree(directory):
    for path in Path(directory).iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(out_dir, step):
    return Path(out_dir) / f".tmp_{checkpoint_name(step)}"


def prepare_staging(out_dir, step):
    """Rank 0: a fresh, empty staging directory for this step (a leftover from a crash is replaced)."""
    tmp = staging_dir(out_dir, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_rank_files(tmp, rank):
    """Every rank: its RNG states."""
    torch.save(rng_state(), Path(tmp) / f"rng_rank{rank}.pt")


def write_main_files(tmp, model_state, optimizer_state, meta):
    """Rank 0: weights, optimizer and metadata."""
    tmp = Path(tmp)
    torch.save(model_state, tmp / "model.pt")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def publish(out_dir, step):
    """Rank 0, after every rank has written: make the checkpoint visible in one atomic rename."""
    tmp, final = staging_dir(out_dir, step), Path(out_dir) / checkpoint_name(step)
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (e.g. a pre-emption right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def prune(out_dir, keep_last, keep_every):
    """Delete all but the newest keep_last checkpoints, sparing steps that are multiples of keep_every."""
    found = list_checkpoints(out_dir)
    for step, path in found[:-keep_last] if keep_last > 0 else found:
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path)


def load_meta(path):
    return json.loads((Path(path) / "meta.json").read_text())


def load_rank_rng(path, rank):
    file = Path(path) / f"rng_rank{rank}.pt"
    return torch.load(file, weights_only=False) if file.exists() else None


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(world_size, device):
    """What a resumed run must share with the run that saved, besides the checkpoint itself, to continue it bit for
    bit: floating-point rounding depends on how work is split (world size; on a CPU, torch's thread count), on the
    kernels (the torch build; the CPU instruction set torch dispatches to, or the GPU model and CUDA version)."""
    env = dict(world_size=world_size, device=device.type, torch=torch.__version__)
    if device.type == "cuda":
        env.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    else:
        env.update(device_name=_cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   threads=torch.get_num_threads())
    return env


def environment_changes(meta, current):
    """['key saved -> now', ...] for what differs between a checkpoint's recorded environment and `current`
    (checkpoints written before the record existed: only their world size is known)."""
    saved = meta.get("environment") or {"world_size": meta.get("world_size")}
    return [f"{key} {saved[key]!r} -> {current.get(key)!r}" for key in saved
            if saved[key] is not None and saved[key] != current.get(key)]


def git_revision():
    """The repository's commit (with '-dirty' if the tree has changes), or 'unknown' outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
