"""
Checkpoints: atomic, complete, discoverable, pruned. This module is the one reader and writer of the format.

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

A model-only checkpoint (`save_model_only`: e.g. a model built in Python, to be evaluated) is the same directory with
model.pt and meta.json (step, tokens, config) only, published the same way. Readers take a checkpoint directory or a
run directory, meaning its newest complete checkpoint (`resolve_checkpoint`); `load_meta` and `load_states` read the
files. A missing, incomplete or unreadable checkpoint is a CheckpointError naming the path and the file.
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

from durable import fsync_dir, fsync_file

CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")


class CheckpointError(ValueError):
    pass


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


def _write_model_and_meta(tmp, model_state, meta):
    torch.save(model_state, Path(tmp) / "model.pt")
    (Path(tmp) / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def write_main_files(tmp, model_state, optimizer_state, meta):
    """Rank 0: weights, optimizer and metadata."""
    torch.save(optimizer_state, Path(tmp) / "optimizer.pt")
    _write_model_and_meta(tmp, model_state, meta)


def publish(out_dir, step):
    """Rank 0, after every rank has written: make the checkpoint visible in one atomic rename. The files are synced
    before the rename and the rename itself after it, so a visible checkpoint survives a power loss complete."""
    tmp, final = staging_dir(out_dir, step), Path(out_dir) / checkpoint_name(step)
    for path in tmp.iterdir():
        fsync_file(path)
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a pre-emption right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    return final


def save_model_only(model, out_dir, step=0, tokens=0, extra_config=None):
    """Publish `model` (a model.GPT) as out_dir/ckpt_NNNNNNN/{model.pt, meta.json}: the format without optimizer
    and RNG states, e.g. to evaluate a model built in Python. meta.json["config"] is model.config plus the training
    keys in `extra_config`. An existing checkpoint of that step is a FileExistsError (nothing is replaced). Returns
    the checkpoint directory."""
    final = Path(out_dir) / checkpoint_name(step)
    if final.exists():
        raise FileExistsError(f"{final} exists; a model-only save does not replace a checkpoint")
    tmp = prepare_staging(out_dir, step)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = dict(step=step, tokens=tokens, config={**model.config.to_dict(), **(extra_config or {})})
    _write_model_and_meta(tmp, state, meta)
    return publish(out_dir, step)


def prune(out_dir, keep_last, keep_every):
    """Delete all but the newest keep_last checkpoints, sparing steps that are multiples of keep_every."""
    found = list_checkpoints(out_dir)
    for step, path in found[:-keep_last] if keep_last > 0 else found:
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path)


def resolve_checkpoint(path):
    """The checkpoint directory for `path`: itself if it holds meta.json or model.pt (then it must hold both), else
    the newest complete ckpt_* in it (a run directory)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory (expected a ckpt_* directory or a run directory)")
    if (path / "meta.json").exists() or (path / "model.pt").exists():
        for name in ("meta.json", "model.pt"):
            if not (path / name).is_file():
                raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint in {path}: expected a ckpt_* directory (with model.pt and meta.json) "
                              f"or a run directory containing ckpt_* directories")
    return resolve_checkpoint(latest)


def load_meta(path):
    """The meta.json of the checkpoint directory `path` as a dict."""
    try:
        return json.loads((Path(path) / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is not valid JSON ({e})") from None


def _read_state(file, weights_only):
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"checkpoint {file.parent}: cannot read {file.name} ({type(e).__name__}: {e})") from None


def load_states(path, optimizer=True):
    """(model state dict, optimizer state dict or None) of the checkpoint directory `path`, on the CPU, exactly as
    saved. Parameter names are the unwrapped model's: a torch.compile or DDP prefix (`_orig_mod.`, `module.`) that
    a checkpoint written from a wrapped model carries is removed. optimizer=False skips optimizer.pt (evaluation;
    a model-only checkpoint has none)."""
    path = Path(path)
    model_state = _read_state(path / "model.pt", weights_only=True)
    model_state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model_state.items()}
    return model_state, _read_state(path / "optimizer.pt", weights_only=False) if optimizer else None


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
