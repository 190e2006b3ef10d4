"""
Checkpoints: atomic, complete, discoverable, pruned. This module is the one reader and writer of the format.

Layout of one checkpoint (a directory under the run's out_dir):

    out_dir/ckpt_0001000/
        model.pt          full (unsharded) model state dict, fp32, written by rank 0
        optimizer.pt      full optimizer state dict keyed by parameter name (portable across DDP/FSDP/world sizes)
        meta.json         step, tokens seen, data-loader state, resolved config, git revision, world size, and
                          the environment a bitwise continuation depends on (`environment`)
        rng_rank{r}.pt    each rank's python/numpy/torch(/cuda) RNG states
        manifest.json     {"format": "size+crc32_head_tail", "files": {name: {"size": bytes, "crc32": int}}} for
                          every other file: its size and zlib.crc32 of its first and last MiB (the whole file when
                          it is under 2 MiB), written last, before publishing

Atomicity: everything is written into `out_dir/.tmp_ckpt_0001000/`, flushed and fsync'ed; then rank 0 renames the
directory to its final name (one rename, atomic on POSIX file systems). A directory named `ckpt_*` is therefore
always complete; a crash mid-write leaves only a `.tmp_*` directory, which the next save of that step replaces and
which is never loaded. Pruning runs after the rename, so the newest complete checkpoint is never deleted.

Verification (`verify_files`, cheap: sizes and 2 MiB per file; `load_for_resume`, exact: every file loaded too):
a checkpoint verifies when every file its manifest lists is present with that size and checksum, meta.json parses,
and (for a resume) model.pt, optimizer.pt and the resuming rank's rng_rank{r}.pt load. A checkpoint written before
manifests existed verifies on what can be checked without one: the files present and loadable. The checksum covers
truncation, deletion and damage near either end of a file (where a torn write lands), not a flipped bit inside:
torch.load catches most of those on resume. `newest_resumable` takes the newest checkpoint that verifies, naming
each newer one it skips and why; a damaged checkpoint is never deleted: `prune` counts and deletes only checkpoints
that verify, and a damaged one that a new save of its step would replace is renamed to `<name>.damaged` instead.

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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from durable import atomic_write_text, fsync_dir, fsync_file
from errors import UserError

CKPT_RE = re.compile(r"^ckpt_(\d{7,})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "size+crc32_head_tail"
CHECKSUM_SPAN = 1 << 20  # bytes read from each end of a file for its checksum
DAMAGED_SUFFIX = ".damaged"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete, damaged or of the wrong kind; the message names path and file."""


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
    write_manifest(tmp)
    fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a pre-emption right after a periodic save)
        _set_aside_or_remove(final)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    return final


def _file_checksum(path):
    """zlib.crc32 of the first and last CHECKSUM_SPAN bytes of `path` (of all of it when shorter than both)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(CHECKSUM_SPAN))
        if size > 2 * CHECKSUM_SPAN:
            f.seek(size - CHECKSUM_SPAN)
        crc = zlib.crc32(f.read(), crc)
    return crc


def write_manifest(tmp):
    """manifest.json of the staged checkpoint `tmp`: size and checksum of every file in it (the module docstring
    has the format). Written atomically, after every other file, so a manifest always describes complete files."""
    files = {p.name: dict(size=p.stat().st_size, crc32=_file_checksum(p))
             for p in sorted(Path(tmp).iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(Path(tmp) / MANIFEST, json.dumps(dict(format=MANIFEST_FORMAT, files=files), indent=1))


def _read_manifest(path):
    """The file records of checkpoint `path`'s manifest, or None for a checkpoint written before manifests."""
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        manifest = json.loads(file.read_text())
        return dict(manifest["files"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({type(e).__name__}: {e})") from None


def verify_files(path):
    """Raise CheckpointError naming the first problem of checkpoint `path` that is found without loading tensors:
    a file of its manifest missing, of another size or checksum; meta.json missing or not JSON; model.pt missing."""
    path = Path(path)
    for name, record in (_read_manifest(path) or {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing (listed in {MANIFEST})")
        if file.stat().st_size != record["size"]:
            raise CheckpointError(f"checkpoint {path}: {name} has {file.stat().st_size} bytes, {MANIFEST} says "
                                  f"{record['size']} (truncated or replaced)")
        if _file_checksum(file) != record["crc32"]:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum in {MANIFEST} (damaged)")
    if not (path / "model.pt").is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: model.pt is missing")
    load_meta(path)


def is_verified(path):
    try:
        verify_files(path)
    except CheckpointError:
        return False
    return True


def _set_aside_or_remove(path):
    """Make room for a new save of the step of checkpoint `path`: an intact one is removed, a damaged one renamed
    to <name>.damaged (kept for inspection: a damaged checkpoint is never deleted)."""
    if is_verified(path):
        shutil.rmtree(path)
        return
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{n}"), n + 1
    print(f"warning: {path} does not verify; kept as {aside}", flush=True)
    os.rename(path, aside)


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
    """Delete all but the newest keep_last checkpoints that verify (verify_files), sparing steps that are multiples
    of keep_every. A checkpoint that does not verify is neither counted nor deleted: the newest checkpoint that
    verifies is never deleted in favour of a damaged one, and a damaged one stays for inspection."""
    found = [(step, path) for step, path in list_checkpoints(out_dir) if is_verified(path)]
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
    file = Path(path) / "meta.json"
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: meta.json must hold a JSON object, got {type(meta).__name__}")
    return meta


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
    """Rank `rank`'s RNG states saved in checkpoint `path`; a missing or unreadable file is a CheckpointError."""
    file = Path(path) / f"rng_rank{rank}.pt"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {file.name} is missing (every rank of the run that "
                              f"saved writes its own)")
    return _read_state(file, weights_only=False)


@dataclass
class ResumeState:
    """Everything one rank restores from a checkpoint, loaded and checked (load_for_resume)."""
    path: Path
    meta: dict
    model_state: dict
    optimizer_state: dict
    rng: dict | None  # None when the world size differs from the saving run's (RNG streams cannot carry over)


def load_for_resume(path, rank, world_size):
    """Checkpoint `path` fully verified and loaded for rank `rank` of `world_size`: files against the manifest,
    meta.json with the keys a resume reads, model.pt, optimizer.pt and (same world size) rng_rank{rank}.pt loaded."""
    verify_files(path)
    meta = load_meta(path)
    missing = [k for k in ("step", "tokens", "loader", "config", "world_size") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path}: meta.json lacks {missing} (a model-only checkpoint cannot resume "
                              f"a training)")
    model_state, optimizer_state = load_states(path)
    rng = load_rank_rng(path, rank) if meta["world_size"] == world_size else None
    return ResumeState(Path(path), meta, model_state, optimizer_state, rng)


def newest_resumable(out_dir, rank, world_size, at_most=None, report=print):
    """load_for_resume of the newest checkpoint in out_dir (of a step <= at_most, when given) that verifies, or None
    when out_dir has no checkpoint. Each newer one that does not verify is skipped with a line through `report`
    saying why, and left in place. Checkpoints exist but none verifies: CheckpointError listing why each failed."""
    found = [(s, p) for s, p in list_checkpoints(out_dir) if at_most is None or s <= at_most]
    problems = []
    for step, path in reversed(found):
        try:
            return load_for_resume(path, rank, world_size)
        except CheckpointError as e:
            problems.append(str(e))
            report(f"warning: skipping checkpoint {path}: {e}; trying an older one (it is kept as it is)")
    if problems:
        raise CheckpointError(f"no checkpoint in {out_dir} verifies: {'; '.join(problems)}. Restore one, or start "
                              f"over in another out_dir")
    return None


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
