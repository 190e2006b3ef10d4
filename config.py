"""
Run configuration: one flat set of typed keys, read from a TOML file and overridden on the command line.

    python -m train configs/medium/rope.toml --max_steps=100 --out_dir=out/test

Keys are the fields of `model.GPTConfig` (the model) plus those of `TrainConfig` below (everything else); the two
sets do not overlap, so every key is addressed by its bare name. A config file may name a `base` file (a path
relative to itself) whose keys it extends or overrides; bases may chain. Values are checked against the field
types: an unknown key, a wrong type or a bad value is a `ConfigError` naming the file, the key and what is allowed.
The fully resolved config (`resolved_dict`) is what checkpoints store and wandb receives.

Values written on a command line are read by one parser, `parse_value` (its docstring has the syntax), whichever
command takes them: train.py `--key=value`, the evaluations' `--override key=value` (model keys only) and the
sweeps' `--set key=value`; so the same text means the same value everywhere.

Run-level rules that train.py applies and the sweep tools check without running it also live here: the number of
updates a config makes (`total_steps`) and which keys a resumed run may change (`RESUMABLE_CHANGES`,
`check_resume_config`).
"""

import difflib
import json
import re
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from device import DTYPES
from errors import UserError
from model import GPTConfig


class ConfigError(UserError, ValueError):
    """A bad config file, key or value; the message names where it was given (file or command line) and the key."""


@dataclass
class TrainConfig:
    # ---- run and data
    out_dir: str = "out/run"  # checkpoints, metrics.jsonl, config.json; an existing run here is resumed
    data_dir: str = "data/shards/sample"  # llm.c-format shards: *_val_000000.bin and *_train_*.bin
    document_aligned: bool = False  # windows start at an EOT token (default: plain windows, as the reference)
    seed: int = 42  # model init; the data order uses data_seed
    data_seed: int = 42
    # ---- batch: the optimisation is fixed by global_batch_size whatever the number of processes
    global_batch_size: int = 480  # sequences per optimizer step (of block_size tokens each)
    micro_batch_size: int = 20  # sequences per forward/backward on one device
    # ---- optimizer and schedule (the GRAPE reference: AdamW, warmup then cosine to min_lr)
    max_steps: int = 25000
    learning_rate: float = 1e-3
    min_lr: float = 3e-5
    warmup_steps: int = 2000
    lr_decay_steps: int = 25000  # the cosine ends here; later steps use min_lr
    weight_decay: float = 0.01  # on every parameter except RMSNorm gains
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    reference_loop_quirks: bool = False  # True reproduces the reference loop: its un-divided accumulation makes the
    # gradient global_batch_size / (8 x micro_batch_size) (3 medium, 4 large) times the mean gradient (clipping sees
    # that norm) at any world size, the first update has lr 0, and max_steps + 1 updates run
    # ---- evaluation, logging, checkpoints
    eval_interval: int = 1000  # steps between validation runs (and at the last step); 0 = only at the end
    val_tokens: int = 10_485_760  # fixed validation budget from shard 0, identical at every evaluation
    log_interval: int = 10
    checkpoint_interval: int = 1000  # steps between checkpoints (and at the last step)
    keep_last: int = 2  # checkpoints kept besides the permanent ones
    keep_every: int = 5000  # checkpoints at multiples of this step are never deleted (0 = none)
    wandb: str = "disabled"  # disabled | offline | online
    wandb_project: str = "grape-pe"
    wandb_run_name: str = ""  # default: the name of out_dir
    # ---- hardware
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA, float32 on CPU) | bfloat16 | float32
    compile: bool = False
    fsdp: bool = False  # FSDP2 (fully_shard per block) instead of DDP
    fsdp_param_dtype: str = "auto"  # FSDP2 all-gathers and computes with parameters in this dtype (the fp32 master
    # weights and AdamW state stay fp32); auto = the run's compute dtype (bfloat16 on CUDA, float32 on CPU)
    fsdp_reduce_dtype: str = "auto"  # FSDP2's gradient reduce-scatter dtype; auto = float32
    fsdp_reshard_after_forward: bool = True  # free each block's gathered parameters after its forward (less memory,
    # a second all-gather in the backward); false keeps them (ZeRO-2-like)
    memory_check: str = "refuse"  # refuse | warn: a run whose estimated peak memory exceeds the device's free memory
    # (memory_plan.py) stops before writing anything, or starts with a warning
    activation_checkpointing: str | int = "none"  # none | full | k: recompute the forward of blocks 0, k, 2k, ...
    # in the backward instead of keeping their activations (parallel.py)
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0: from the GPU's name (mfu.PEAK_BF16), n/a on CPU
    model: GPTConfig = field(default_factory=GPTConfig)

    def resolved_dict(self):
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {**self.model.to_dict(), **out}


CHOICES = {"wandb": ("disabled", "offline", "online"), "dtype": DTYPES, "fsdp_param_dtype": DTYPES,
           "fsdp_reduce_dtype": DTYPES, "memory_check": ("refuse", "warn")}
TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "model"}
MODEL_FIELDS = {f.name: f for f in fields(GPTConfig)}
assert not TRAIN_FIELDS.keys() & MODEL_FIELDS.keys()


def _allowed_types(annotation):
    """The concrete types a field accepts, e.g. float | None -> (float, NoneType)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return typing.get_args(annotation)
    return (annotation,)


def _check_type(key, value, where):
    spec = MODEL_FIELDS.get(key) or TRAIN_FIELDS.get(key)
    allowed = _allowed_types(spec.type)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # TOML "1" for a float key
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"{where}: key {key!r} must be {_type_names(allowed)}, got {value!r} "
                          f"({type(value).__name__})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: key {key!r} must be one of {CHOICES[key]}, got {value!r}")
    return value


def _unknown_key(key, where):
    known = sorted(TRAIN_FIELDS) + sorted(MODEL_FIELDS)
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint} (model keys: {', '.join(sorted(MODEL_FIELDS))}; "
                       f"training keys: {', '.join(sorted(TRAIN_FIELDS))})")


def read_toml(path, what="config file"):
    """The parsed TOML file; a missing file or invalid TOML is a ConfigError naming the path."""
    if not Path(path).is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def read_config_file(path, _seen=()):
    """The merged key/value dict of a TOML config and its `base` chain (later files win)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: circular 'base' chain {[str(p) for p in _seen]}")
    raw = read_toml(path)
    base = raw.pop("base", None)
    merged = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base' must be a path string, got {base!r}")
        merged = read_config_file(path.parent / base, _seen + (path,))
    for key, value in raw.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: tables are not used; write '{key}.x' keys at the top level")
        if key not in TRAIN_FIELDS and key not in MODEL_FIELDS:
            raise _unknown_key(key, str(path))
        merged[key] = (_check_type(key, value, str(path)), str(path))
    return merged


NOT_TOML = object()  # toml_literal's answer for text that is not one TOML value
BOOL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
NONE_WORDS = ("none", "null")


def toml_literal(text):
    """`text` read as one TOML value (10, 1_000, 0x1F, 1e-3, inf, true, "a b", 'x', [1, 2], ...), or NOT_TOML."""
    if "\n" in text:
        return NOT_TOML
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return NOT_TOML


def _number(word, literal):
    if isinstance(literal, (int, float)) and not isinstance(literal, bool):
        return literal
    try:
        return float(word)
    except ValueError:
        return None


def _type_names(allowed):
    return " or ".join("none" if t is type(None) else t.__name__ for t in allowed)


def parse_value(key, text, where="value"):
    """The value of config key `key` written as the string `text`: the one reading of values given on a command
    line (train.py --key=value, the evaluations' --override key=value, the sweeps' --set key=value). Surrounding
    whitespace is ignored, and the first of these readings that the key's type allows is taken:

        none, null                         None
        true, yes, 1 / false, no, 0        a bool (any case)
        a whole number                     an int: TOML integers (480, 1_000, 0x1F) and whole floats (1e5, 480.0)
        a number                           a float: TOML or Python syntax (3e-4, 1_000.5, inf)
        a quoted TOML string ("a", 'b')    the string between the quotes
        anything else                      the text itself, as a string

    An unknown key, a value of no allowed type, or a value outside the key's choices is a ConfigError that starts
    with `where` and names the key, the value and what was expected."""
    spec = MODEL_FIELDS.get(key) or TRAIN_FIELDS.get(key)
    if spec is None:
        raise _unknown_key(key, where)
    allowed = _allowed_types(spec.type)
    word = text.strip()
    literal = toml_literal(word)
    if type(None) in allowed and word.lower() in NONE_WORDS:
        return None
    if bool in allowed and word.lower() in BOOL_WORDS:
        return BOOL_WORDS[word.lower()]
    number = _number(word, literal)
    if int in allowed and number is not None and (isinstance(number, int) or number.is_integer()):
        return _check_type(key, int(number), where)
    if float in allowed and number is not None:
        return _check_type(key, float(number), where)
    if str in allowed:
        return _check_type(key, literal if isinstance(literal, str) else word, where)
    raise ConfigError(f"{where}: key {key!r} must be {_type_names(allowed)}, got {text!r}")


def split_setting(text, where):
    """'key=value' -> (key, value text): the key stripped, with '-' read as '_' (rope-base = rope_base)."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"{where} must look like key=value")
    return key, value


def parse_setting(text, where):
    """'key=value' -> (key, typed value) through parse_value; `where` (e.g. "--set 'seed=1'") starts any error."""
    key, value = split_setting(text, where)
    return key, parse_value(key, value, where)


def parse_override(arg):
    """train.py's '--key=value' -> (key, typed value)."""
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"command-line override {arg!r} must look like --key=value")
    return parse_setting(arg[2:], f"override {arg!r}")


def load_config(path=None, overrides=()):
    """TrainConfig from a TOML file (or the defaults) plus '--key=value' overrides, validated. An error about one
    key names where that key's value came from: the command-line override, or the file (of the base chain) that
    set it."""
    file_values = read_config_file(path) if path is not None else {}
    values = {k: v for k, (v, _) in file_values.items()}
    origins = {k: where for k, (_, where) in file_values.items()}
    for arg in overrides:
        key, value = parse_override(arg)
        values[key], origins[key] = value, f"override {arg!r}"
    return build_config(values, where=str(path) if path else "config", origins=origins)


_GPTCONFIG_KEY = re.compile(r"GPTConfig\.(\w+)")


def build_config(values, where="config", origins=None):
    """TrainConfig from a flat dict of already-typed values (e.g. a checkpoint's resolved config). origins: where
    each key's value was given (load_config), used in place of `where` in an error about that key."""
    blame = _blamer(where, origins)
    for key, value in values.items():
        if key not in TRAIN_FIELDS and key not in MODEL_FIELDS:
            raise _unknown_key(key, blame(key))
        _check_type(key, value, blame(key))
    model_kw = {k: v for k, v in values.items() if k in MODEL_FIELDS}
    train_kw = {k: v for k, v in values.items() if k in TRAIN_FIELDS}
    try:
        model = GPTConfig(**model_kw)
    except ValueError as e:
        key = _GPTCONFIG_KEY.search(str(e))
        raise ConfigError(f"{blame(key.group(1) if key else None)}: {e}") from None
    cfg = TrainConfig(**train_kw, model=model)
    validate(cfg, where, origins)
    return cfg


def _blamer(where, origins):
    """key -> where its value was given: origins[key] when known, else `where`."""
    return lambda key: (origins or {}).get(key, where)


def validate(cfg, where="config", origins=None):
    blame = _blamer(where, origins)
    positive = ["global_batch_size", "micro_batch_size", "max_steps", "val_tokens", "log_interval",
                "checkpoint_interval", "keep_last"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{blame(key)}: key {key!r} must be > 0, got {getattr(cfg, key)}")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "eval_interval",
                "keep_every", "adam_eps", "peak_flops"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{blame(key)}: key {key!r} must be >= 0, got {getattr(cfg, key)}")
    if cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"{blame('min_lr')}: min_lr ({cfg.min_lr}) must not exceed learning_rate "
                          f"({cfg.learning_rate})")
    setting = cfg.activation_checkpointing
    if not (setting in ("none", "full") or (isinstance(setting, int) and not isinstance(setting, bool)
                                            and setting >= 1)):
        raise ConfigError(f"{blame('activation_checkpointing')}: key 'activation_checkpointing' must be none, full or "
                          f"a positive int k (every k-th block), got {setting!r}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"{blame('device')}: key 'device' must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    return cfg


def total_steps(cfg):
    """The number of optimizer updates: max_steps (the reference loop runs max_steps + 1)."""
    return cfg.max_steps + 1 if cfg.reference_loop_quirks else cfg.max_steps


# Keys that may differ when a run is resumed: they change neither the model nor the data order. (max_steps and
# lr_decay_steps extend or shorten the schedule from the resumed step on; data_dir may move; the rest is bookkeeping
# or hardware.)
RESUMABLE_CHANGES = {"max_steps", "eval_interval", "log_interval", "checkpoint_interval", "keep_last", "keep_every",
                     "wandb", "wandb_project", "wandb_run_name", "device", "compile", "peak_flops", "out_dir",
                     "micro_batch_size", "fsdp", "data_dir", "lr_decay_steps", "val_tokens", "fsdp_param_dtype",
                     "fsdp_reduce_dtype", "fsdp_reshard_after_forward", "activation_checkpointing", "memory_check"}


def check_resume_config(saved, cfg, where):
    """A ConfigError unless the resolved config dict `saved` (config.json, a checkpoint's meta) and `cfg` differ
    only in RESUMABLE_CHANGES. A key that `saved` lacks (written before the key existed) had that key's default."""
    current = cfg.resolved_dict()
    defaults = TrainConfig().resolved_dict()
    was = lambda k: saved.get(k, defaults[k])
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and was(k) != current[k])
    if changed:
        detail = ", ".join(f"{k}: {was(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(f"{where} holds a run with a different config ({detail}); use another out_dir or the "
                          f"same config (only {sorted(RESUMABLE_CHANGES)} may change on resume)")


def replace(cfg, **changes):
    """A copy of cfg with some keys changed (model or training keys), re-validated."""
    values = cfg.resolved_dict()
    values.update(changes)
    return build_config(values)



# ------------------------------------------------------------------------------------------- files of a run directory


def read_json_file(path, what="JSON file"):
    """The parsed JSON file `path`; unreadable or invalid JSON is a ConfigError naming the file and, for invalid
    JSON, the line and column where parsing stopped."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: {what} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; restore "
                          f"it (a checkpoint's meta.json holds the same config) or use another out_dir") from None


def read_metrics_file(path):
    """(records, intact) of a metrics.jsonl (one JSON object per line). A last line that is not valid JSON is what a
    crash or a full disk leaves mid-write: it is dropped with a warning naming the file and the line, and intact is
    False (also when the last line lacks its newline). An invalid line before the last is a ConfigError naming the
    file and line: that is not a torn write but damage."""
    text = Path(path).read_text()
    lines = text.splitlines()
    records, intact = [], text.endswith("\n") or not text
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number < len(lines):
                raise ConfigError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno}); expected "
                                  f"one JSON object per line") from None
            print(f"warning: {path}: line {number} is incomplete (a crash or a full disk while it was written); "
                  f"dropped: {line[:80]!r}", file=sys.stderr)
            intact = False
            continue
        if not isinstance(record, dict):
            raise ConfigError(f"{path}: line {number} is {type(record).__name__}, expected a JSON object")
        records.append(record)
    return records, intact
