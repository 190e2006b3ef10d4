"""
Load a training checkpoint for evaluation.

A checkpoint is a directory written by train.py (checkpoint.py): `ckpt_NNNNNNN/{model.pt, meta.json, ...}` where
meta.json["config"] is the flat resolved config (GPTConfig fields + training fields). A *run* directory (a training
out_dir) stands for its newest complete checkpoint. Everything that can be wrong is reported as one
`CheckpointError` naming the path: no checkpoint there, a missing file, a config the current model code does not
accept (a renamed or removed field), weights that do not fit the config.

Config overrides change GPTConfig fields at load time without touching the weights, e.g. `block_size=8192` or the
inference-time RoPE scalings (`rope_scaling=yarn`, `rope_scaling_factor=4`); `train_length` is pinned to the
checkpoint's training length, so that RoPE-ID and the scalings keep referring to it. They are given as "key=value" strings and
typed from the field's declared type; only GPTConfig fields can be overridden (training fields mean nothing here).
"""

import dataclasses
import difflib
import json
import os
import types
import typing
from contextlib import nullcontext
from pathlib import Path

import torch

import checkpoint as ckpt
from config import ConfigError, build_config
from model import GPT, GPTConfig


class CheckpointError(ValueError):
    pass


def set_offline_defaults():
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 unless the user set them: nothing here needs the Hub, and with
    them unset `datasets` still sends telemetry requests. Must run before datasets / huggingface_hub are imported
    (they read the variables at import time). Setting HF_HUB_OFFLINE=0 re-enables Hub downloads."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")


def resolve_checkpoint(path):
    """The checkpoint directory for `path`: itself if it holds meta.json + model.pt, else the newest ckpt_* in it."""
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
    latest = ckpt.latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint in {path}: expected a ckpt_* directory (with model.pt and meta.json) "
                              f"or a run directory containing ckpt_* directories")
    return resolve_checkpoint(latest)


def _field_types(annotation):
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def parse_overrides(items):
    """["key=value", ...] or {key: value} -> {key: typed value} for GPTConfig fields (bool, int, float, str, None)."""
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    model_fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    out = {}
    for item in items or ():
        if "=" not in item:
            raise CheckpointError(f"config override {item!r} must look like key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        if key not in model_fields:
            close = difflib.get_close_matches(key, model_fields, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise CheckpointError(f"config override {item!r}: {key!r} is not a model config field{hint}; "
                                  f"fields: {', '.join(model_fields)}")
        allowed = _field_types(model_fields[key].type)
        word = text.lower()
        if type(None) in allowed and word in ("none", "null"):
            value = None
        elif bool in allowed:
            if word not in ("true", "false", "1", "0", "yes", "no"):
                raise CheckpointError(f"config override {item!r}: {key} is a bool (true/false)")
            value = word in ("true", "1", "yes")
        elif int in allowed and text.lstrip("-").isdigit():
            value = int(text)
        elif float in allowed:
            try:
                value = float(text)
            except ValueError:
                raise CheckpointError(f"config override {item!r}: {key} is a number") from None
        elif str in allowed:
            value = text
        else:
            raise CheckpointError(f"config override {item!r}: cannot parse {text!r} as {allowed}")
        out[key] = value
    return out


def load_config(path, overrides=None):
    """(checkpoint dir, GPTConfig, meta) for a checkpoint or run directory, with overrides applied."""
    path = resolve_checkpoint(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: meta.json is not valid JSON ({e})") from None
    if "config" not in meta:
        raise CheckpointError(f"checkpoint {path}: meta.json has no 'config' entry")
    values = {**meta["config"], **parse_overrides(overrides)}
    # the length the PEs were trained at stays the checkpoint's, whatever block_size an evaluation asks for
    values["train_length"] = meta["config"].get("train_length") or meta["config"].get("block_size", 0)
    try:
        cfg = build_config(values, where=str(path / "meta.json")).model
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} is not compatible with this model code: {e}") from None
    return path, cfg, meta


def load_model(path, device="cpu", overrides=None):
    """(model in eval mode without gradients, info) for a checkpoint or run directory. info: path, step, tokens,
    config (the GPTConfig as a dict, overrides applied), overrides, trained_block_size (before overrides)."""
    path, cfg, meta = load_config(path, overrides)
    device = resolve_device(device)
    try:
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which one
        raise CheckpointError(f"checkpoint {path}: cannot read model.pt ({type(e).__name__}: {e})") from None
    # torch.compile / DDP wrappers prefix parameter names; the weights are the same.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    with torch.device(device):
        model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and "transformer.wte.weight" in state)]  # tied
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: weights do not fit the config (pos_encoding={cfg.pos_encoding!r}); "
                              f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    model.eval().requires_grad_(False)
    info = dict(path=str(path), step=meta.get("step"), tokens=meta.get("tokens"), config=cfg.to_dict(),
                overrides=parse_overrides(overrides),
                trained_block_size=meta["config"].get("block_size", cfg.block_size))
    return model, info


def save_checkpoint(model, out_dir, step=0, tokens=0, extra_config=None):
    """Write `model` as out_dir/ckpt_NNNNNNN/{model.pt, meta.json} in train.py's layout (no optimizer or RNG state),
    e.g. to evaluate a model built in Python. meta.json["config"] is the GPTConfig plus `extra_config` training keys.
    Returns the checkpoint directory."""
    path = Path(out_dir) / ckpt.checkpoint_name(step)
    path.mkdir(parents=True, exist_ok=False)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / "model.pt")
    meta = dict(step=step, tokens=tokens, config={**model.config.to_dict(), **(extra_config or {})})
    (path / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return path


def resolve_device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device} requested but CUDA is not available")
    return device


def autocast(device, dtype):
    """The precision context: dtype 'float32' runs in fp32; 'bfloat16' autocasts matmuls to bf16 (as training did
    on CUDA); 'auto' is bfloat16 on CUDA and float32 elsewhere. The model returns fp32 logits either way."""
    device = torch.device(device)
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
