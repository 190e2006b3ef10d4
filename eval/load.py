"""
Evaluation's one route from a checkpoint to a model ready to score:

    loaded = load("out/medium_rope", overrides=["block_size=8192"], device="auto", dtype="float32")
    with loaded.amp:
        logits, _ = loaded.model(idx.to(loaded.device))

`load` returns a `Loaded`: the model (eval mode, no gradients, on its device), its GPTConfig (overrides applied),
the torch device, the precision context (device.py) and `info` (path, step, tokens, config as a dict, overrides,
trained_block_size). The checkpoint is a ckpt_* directory written by train.py or checkpoint.save_model_only, or a
run directory standing for its newest complete checkpoint (checkpoint.py reads the files). `Checkpoint(path)` reads
meta.json once and can build several models from it (`Checkpoint.load`), e.g. the same weights under several RoPE
scalings. Everything that can be wrong with a checkpoint is one CheckpointError naming the path: no checkpoint there,
a missing file, a config the current model code does not accept (a renamed or removed field), weights that do not
fit the config.

Overrides change model (GPTConfig) keys at load time without touching the weights, e.g. `block_size=8192` or the
inference-time RoPE scalings (`rope_scaling=yarn`, `rope_scaling_factor=4`); `train_length` is pinned to the
checkpoint's training length, so that RoPE-ID and the scalings keep referring to it. They are "key=value" strings
(or a {key: value} dict), read by config.parse_value as train.py reads its command line; training keys mean nothing
here and are refused.
"""

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from checkpoint import CheckpointError, load_meta, load_states, resolve_checkpoint
from config import MODEL_FIELDS, ConfigError, build_config, parse_setting
from device import autocast_context, resolve_device
from model import GPT, GPTConfig


def set_offline_defaults():
    """HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 unless the user set them: nothing here needs the Hub, and with
    them unset `datasets` still sends telemetry requests. Must run before datasets / huggingface_hub are imported
    (they read the variables at import time). Setting HF_HUB_OFFLINE=0 re-enables Hub downloads."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(name, "1")


def model_overrides(items):
    """["key=value", ...] or {key: value} -> {key: typed value} of model keys (config.parse_value types them)."""
    if isinstance(items, dict):
        items = [f"{k}={v}" for k, v in items.items()]
    out = {}
    for item in items or ():
        where = f"config override {item!r}"
        try:
            key, value = parse_setting(item, where)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        if key not in MODEL_FIELDS:
            raise CheckpointError(f"{where}: {key!r} is a training key, not a model config field; model keys: "
                                  f"{', '.join(MODEL_FIELDS)}")
        out[key] = value
    return out


@dataclass
class Loaded:
    """A model ready to evaluate and what goes with it (see the module docstring)."""
    model: GPT
    config: GPTConfig  # overrides applied; model.config is this object
    device: torch.device
    amp: AbstractContextManager  # the precision context: `with loaded.amp:` around every forward
    info: dict

    def summary(self):
        """What an evaluation result records about a checkpoint's model, in this order."""
        return dict(path=self.info["path"], step=self.info["step"], pos_encoding=self.config.pos_encoding,
                    kv_shift=self.config.kv_shift, block_size=self.info["trained_block_size"],
                    overrides=self.info["overrides"])


def ready(model, device="auto", dtype="float32", info=None):
    """An in-memory model as `load` returns a checkpoint's: in eval mode without gradients, on `device` (auto: where
    its parameters are), with the precision context for `dtype`."""
    device = next(model.parameters()).device if device in (None, "auto") else resolve_device(device)
    amp = autocast_context(device, dtype)
    model = model.to(device).eval().requires_grad_(False)
    return Loaded(model=model, config=model.config, device=device, amp=amp,
                  info=info or dict(path=None, config=model.config.to_dict()))


class Checkpoint:
    """One checkpoint directory (a run directory: its newest checkpoint) with its meta.json, read once."""

    def __init__(self, path):
        self.path = resolve_checkpoint(path)
        self.meta = load_meta(self.path)
        if "config" not in self.meta:
            raise CheckpointError(f"checkpoint {self.path}: meta.json has no 'config' entry")

    def model_config(self, overrides=None):
        """The GPTConfig of the checkpoint with `overrides` (strings or a dict, see model_overrides) applied."""
        return self._config(model_overrides(overrides))

    def _config(self, overrides):
        saved = self.meta["config"]
        values = {**saved, **overrides}
        # the length the PEs were trained at stays the checkpoint's, whatever block_size an evaluation asks for
        values["train_length"] = saved.get("train_length") or saved.get("block_size", 0)
        try:
            return build_config(values, where=str(self.path / "meta.json")).model
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {self.path} is not compatible with this model code: {e}") from None

    def load(self, overrides=None, device="auto", dtype="float32"):
        """The checkpoint's weights in a model built from its config with `overrides`, ready on `device`."""
        overrides = model_overrides(overrides)
        cfg = self._config(overrides)
        device = resolve_device(device)
        state, _ = load_states(self.path, optimizer=False)
        with torch.device(device):
            model = GPT(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and "transformer.wte.weight" in state)]  # tied
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {self.path}: weights do not fit the config (pos_encoding="
                                  f"{cfg.pos_encoding!r}); missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                                  f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        info = dict(path=str(self.path), step=self.meta.get("step"), tokens=self.meta.get("tokens"),
                    config=cfg.to_dict(), overrides=overrides,
                    trained_block_size=self.meta["config"].get("block_size", cfg.block_size))
        return ready(model, device, dtype, info)


def load(path, overrides=None, device="auto", dtype="float32"):
    """The model of the checkpoint or run directory `path`, ready to evaluate (see the module docstring)."""
    return Checkpoint(path).load(overrides, device, dtype)

