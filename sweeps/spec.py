"""
Sweep specs: a TOML file naming base configs, a grid of config values, SLURM resources and the evaluations chained
after training. configs/sweeps/*.toml are the examples.

    description = "..."                 # free text (optional)
    out_root = "out/paper_tables"       # run directories <out_root>/<run name>; a relative path is relative to the
                                        # working directory (default: out/<spec file stem>)

    [sizes]                             # size name -> base config, a train.py TOML (relative to the spec file)
    medium = "../base/medium.toml"

    [grid]                              # a list is an axis; a scalar is a setting shared by every run
    size = ["medium", "large"]          # picks the base config from [sizes]; `config = [paths]` names files instead
    pos_encoding = ["rope", "alibi"]
    kv_shift = [false, true]
    seed = [42]                         # also sets data_seed, unless the run gives data_seed itself
    max_steps = 25000                   # any train.py config key (config.py lists them)

    [[exclude]]                         # drop the grid runs whose axes match every key given (a list: any of it)
    kv_shift = true
    pos_encoding = ["alibi"]

    [[include]]                         # add runs: the keys given (lists expand), every other axis over its grid
    size = "medium"                     # values; included runs are not subject to exclude
    pos_encoding = ["grape_a_q", "grape_a_k"]

    [resources]                         # SLURM, see Resources below and slurm.py
    gpus_per_node = 8

    [eval.zero_shot]                    # python -m eval.zero_shot --checkpoint <final checkpoint> ARGS
    args = ["--limit", "100"]
    [eval.extrapolation]                # python -m eval.extrapolation --checkpoint <final> --lengths L ARGS
    lengths = "1x,2x,4x"                # (--data-dir defaults to the run's data_dir)
    args = ["--tokens", "32768"]

Expansion: the Cartesian product of the grid's axes (in the order written), minus the excluded runs, plus the
included ones. Runs with the same name and the same values are one run; the same name with different values is an
error (the key that differs should be an axis).

Names: <size | config stem>_<pos_encoding>[_kvshift][_<key>-<value> per other axis]_s<seed>[_d<data_seed>], the
d part only when data_seed differs from seed, e.g. medium_grape_ap_kvshift_s42. pos_encoding, kv_shift and seed
are read from the run's values (base file, then spec), so a name does not depend on whether they were axes.

Validation: the spec's own tables are checked here (unknown keys and wrong types name the spec file, the key and
what is allowed). Each run's config is resolved by config.py: the base file's values, then the run's typed values,
through build_config, so an unknown config key, a wrong type or an unknown positional encoding is config.py's error
prefixed with the spec file and the run. The command line the run is launched with (train.py BASE --key=value ...)
is re-read with config.load_config and must resolve to the same config, so what was validated is what runs. The
evaluation arguments are parsed by the evaluation modules' own parsers.
"""

import contextlib
import fnmatch
import io
import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import checkpoint as ckpt
from config import (MODEL_FIELDS, TRAIN_FIELDS, ConfigError, build_config, load_config, parse_value, read_config_file,
                    read_toml, split_setting, toml_literal, total_steps)
from errors import UserError

REPO = Path(__file__).resolve().parent.parent
SELECTORS = ("size", "config")  # grid keys that choose the base config (not config keys)
SET_BY_SWEEP = {"out_dir": "<out_root>/<run name>"}
NAMED_KEYS = ("pos_encoding", "kv_shift", "seed", "data_seed")  # always part of a name, in their own format


class SpecError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Resources:
    """[resources]: what each run's batch job asks SLURM for (slurm.py renders it)."""
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 0  # 0: not requested (the cluster's default)
    time: str = ""  # sbatch --time, e.g. "24:00:00"; "": the partition's limit
    partition: str = ""
    account: str = ""
    qos: str = ""
    mem: str = ""  # e.g. "0" (all of the node's memory)
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit: time to finish a step and checkpoint
    rdzv_port: int = 29500
    sbatch: tuple = ()  # more sbatch options, e.g. ["--exclusive", "--constraint=h100"]
    setup: tuple = ()  # shell lines run before launching, e.g. ["source .venv/bin/activate"]


@dataclass(frozen=True)
class Eval:
    """One evaluation chained after training: `python -m eval.<name> ...` on the final checkpoint."""
    name: str  # zero_shot | extrapolation
    args: tuple  # the module's command-line arguments (the interpreter and -m eval.<name> excluded)
    lengths: tuple = ()  # extrapolation: the lengths asked for (state.py compares them with the output)

    def argv(self, python="python"):
        return [python, "-m", f"eval.{self.name}", *self.args]


@dataclass
class Run:
    name: str
    origin: str  # where in the spec it comes from: "[grid]" or "[[include]] 1"
    axes: dict  # its axis values as written in the spec, selectors included
    base_config: Path
    values: dict  # the typed config values the spec gives on top of the base file (out_dir included)
    cfg: object = None  # config.TrainConfig, once resolved
    evals: list = field(default_factory=list)

    @property
    def out_dir(self):
        return Path(self.values["out_dir"])

    @property
    def size(self):
        return self.axes.get("size") or Path(self.axes["config"]).stem

    @property
    def total_steps(self):
        return total_steps(self.cfg)

    @property
    def final_checkpoint(self):
        return self.out_dir / ckpt.checkpoint_name(self.total_steps)

    def overrides(self):
        return [f"--{key}={format_value(value)}" for key, value in self.values.items()]

    def train_args(self):
        """The training command's arguments after `python` (or torchrun), to be run from the repository root."""
        return ["-m", "train", display_path(self.base_config), *self.overrides()]


@dataclass
class Spec:
    path: Path
    description: str
    out_root: Path
    resources: Resources
    runs: list  # the selected runs, resolved
    all_names: list  # every run of the spec, selected or not


# ---------------------------------------------------------------------------------------------------- small helpers


def display_path(path):
    """A path relative to the repository root when it is inside it (readable scripts), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def format_value(value):
    """A typed config value as config.py's command-line parser reads it back (checked by _check_round_trip)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, float) else str(value)


def _name_part(text):
    return re.sub(r"[^A-Za-z0-9._-]", "-", str(text))


def _field_default(key):
    spec = MODEL_FIELDS.get(key) or TRAIN_FIELDS.get(key)
    return spec.default


TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "a table", list: "a list",
              "strings": "a list of strings", "tables": "an array of tables ([[...]])"}


def _check_type(value, want, where):
    ok = {
        "strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "tables": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    }.get(want, lambda v: isinstance(v, want))
    if not ok(value):
        raise SpecError(f"{where} must be {TYPE_NAMES[want]}, got {value!r}")
    return value


def _check_table(table, schema, where):
    for key, value in table.items():
        if key not in schema:
            raise SpecError(f"{where}: unknown key {key!r}; allowed: {', '.join(schema)}")
        _check_type(value, schema[key], f"{where}: key {key!r}")


# ------------------------------------------------------------------------------------------------------ the spec file


SPEC_SCHEMA = {"description": str, "out_root": str, "sizes": dict, "grid": dict, "include": "tables",
               "exclude": "tables", "resources": dict, "eval": dict}
RESOURCE_SCHEMA = {f.name: ("strings" if f.type is tuple else f.type) for f in fields(Resources)}
EVAL_SCHEMA = {"zero_shot": {"args": "strings"}, "extrapolation": {"lengths": str, "args": "strings"}}
EVAL_SET_BY_SWEEP = ("--checkpoint", "--lengths", "--out", "--out-dir")  # outputs must land where state.py looks


def read_spec(path):
    """The spec's raw tables, with its own keys checked (config keys are checked when runs are resolved)."""
    path = Path(path)
    try:
        raw = read_toml(path, "sweep spec")
    except ConfigError as e:
        raise SpecError(str(e)) from None
    _check_table(raw, SPEC_SCHEMA, str(path))
    for key in ("resources", "eval", "sizes"):
        raw.setdefault(key, {})
    _check_table(raw["resources"], RESOURCE_SCHEMA, f"{path} [resources]")
    _check_table(raw["eval"], {k: dict for k in EVAL_SCHEMA}, f"{path} [eval]")
    for name, table in raw["eval"].items():
        _check_table(table, EVAL_SCHEMA[name], f"{path} [eval.{name}]")
    if name := next((k for k in raw["sizes"] if not isinstance(raw["sizes"][k], str)), None):
        raise SpecError(f"{path} [sizes]: {name!r} must be the path of a config file, got {raw['sizes'][name]!r}")
    if "grid" not in raw:
        raise SpecError(f"{path}: no [grid] table (the runs' axes: size or config, pos_encoding, seed, ...)")
    for where, table in [("[grid]", raw["grid"])] + [(f"[[include]] {i + 1}", t)
                                                     for i, t in enumerate(raw.get("include", []))]:
        for key in table:
            if key in SET_BY_SWEEP:
                raise SpecError(f"{path} {where}: key {key!r} is set by the sweep ({SET_BY_SWEEP[key]})")
            if isinstance(table[key], dict):
                raise SpecError(f"{path} {where}: key {key!r} must be a value or a list of values, not a table")
    return raw


def _resources(raw, path):
    table = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["resources"].items()}
    res = Resources(**table)
    for key in ("nodes", "gpus_per_node", "signal_seconds"):
        if getattr(res, key) <= 0:
            raise SpecError(f"{path} [resources]: key {key!r} must be > 0, got {getattr(res, key)}")
    return res


# ---------------------------------------------------------------------------------------------------------- expansion


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _product(axes):
    """[{key: value}] over the Cartesian product of {key: [values]}, the first key varying slowest."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _matches(axes, entry):
    return all(key in axes and axes[key] in _as_list(value) for key, value in entry.items())


def _expand(raw, path):
    """[(origin, axes, extra name keys)] for every run of the spec, before any config is read."""
    grid = raw["grid"]
    list_axes = {k: v for k, v in grid.items() if isinstance(v, list)}
    for key, values in list_axes.items():
        if not values:
            raise SpecError(f"{path} [grid]: axis {key!r} is an empty list")
    planned = []
    for i, entry in enumerate(raw.get("exclude", [])):
        if unknown := [k for k in entry if k not in grid]:
            raise SpecError(f"{path} [[exclude]] {i + 1}: {unknown[0]!r} is not a grid key "
                            f"(grid keys: {', '.join(grid)})")
    settings = {k: v for k, v in grid.items() if k not in list_axes}
    for axes in _product(list_axes):
        if not any(_matches({**settings, **axes}, entry) for entry in raw.get("exclude", [])):
            planned.append(("[grid]", axes, list(list_axes)))
    for i, entry in enumerate(raw.get("include", [])):
        own = {k: _as_list(v) for k, v in entry.items()}
        inherited = {k: v for k, v in list_axes.items() if k not in own}
        for axes in _product({**inherited, **own}):
            keys = [k for k in list_axes] + [k for k in own if k not in list_axes]
            planned.append((f"[[include]] {i + 1}", axes, keys))
    return planned


def _base_config(raw, path, axes, where):
    if "size" in axes and "config" in axes:
        raise SpecError(f"{where}: give size or config, not both")
    if "size" in axes:
        if axes["size"] not in raw["sizes"]:
            raise SpecError(f"{where}: size {axes['size']!r} is not in [sizes] (sizes: "
                            f"{', '.join(raw['sizes']) or 'none'})")
        file = raw["sizes"][axes["size"]]
    elif "config" in axes:
        file = axes["config"]
        if not isinstance(file, str):
            raise SpecError(f"{where}: config must be the path of a config file, got {file!r}")
    else:
        raise SpecError(f"{where}: no base config; give [sizes] and a grid key size, or a grid key config")
    base = (path.parent / file).resolve()
    if not base.is_file():
        raise SpecError(f"{where}: base config not found: {base}")
    return base


def _base_values(base, where):
    try:
        return {k: v for k, (v, _) in read_config_file(base).items()}
    except ConfigError as e:
        raise SpecError(f"{where}: {e}") from None


def _run_name(prefix, merged, axes, name_keys):
    get = lambda key: merged.get(key, _field_default(key))
    parts = [prefix, get("pos_encoding")]
    if get("kv_shift"):
        parts.append("kvshift")
    parts += [f"{k}-{format_value(axes[k])}" for k in name_keys if k not in SELECTORS + NAMED_KEYS]
    parts.append(f"s{get('seed')}")
    if get("data_seed") != get("seed"):
        parts.append(f"d{get('data_seed')}")
    return "_".join(_name_part(p) for p in parts)


def plan(raw, path, out_root):
    """Every run of the spec, named, with its base config and values, not yet resolved."""
    grid_settings = {k: v for k, v in raw["grid"].items() if not isinstance(v, list)}
    runs = {}
    for origin, axes, name_keys in _expand(raw, path):
        axes = {**{k: v for k, v in grid_settings.items() if k in SELECTORS}, **axes}
        where = f"{path} {origin} run {', '.join(f'{k}={v!r}' for k, v in axes.items())}"
        base = _base_config(raw, path, axes, where)
        values = {**grid_settings, **axes}
        for key in SELECTORS:
            values.pop(key, None)
        if "seed" in values and "data_seed" not in values:
            values["data_seed"] = values["seed"]  # a seed changes the data order too, unless told otherwise
        merged = {**_base_values(base, where), **values}
        prefix = axes.get("size") or base.stem
        name = _run_name(prefix, merged, axes, name_keys)
        values["out_dir"] = str(out_root / name)
        run = Run(name=name, origin=origin, axes=axes, base_config=base, values=values)
        if name in runs:
            other = runs[name]
            if (other.base_config, other.values) != (base, values):
                raise SpecError(f"{path}: {other.origin} and {origin} both make run {name!r} with different values "
                                f"({other.values} vs {values}); make the key that differs a grid axis")
            continue
        runs[name] = run
    return list(runs.values())


# --------------------------------------------------------------------------------------------------------- resolution


def _check_round_trip(run, where):
    """The launch command must resolve to the validated config (config.py parses it as train.py will)."""
    try:
        again = load_config(run.base_config, run.overrides())
    except ConfigError as e:
        raise SpecError(f"{where}: the command line does not parse back: {e}") from None
    want, got = run.cfg.resolved_dict(), again.resolved_dict()
    if want != got:
        diff = {k: (want[k], got.get(k)) for k in want if want[k] != got.get(k)}
        raise SpecError(f"{where}: the command line resolves differently from the spec's values: {diff}")


def _parse_eval_args(module, argv, where):
    """Parse with the evaluation module's own argparse parser; its error (usually SystemExit) becomes a SpecError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            module.parse_args(argv)
    except SystemExit:
        raise SpecError(f"{where}: {err.getvalue().strip().splitlines()[-1]}") from None


def _evals(raw, path, run):
    from eval import extrapolation, zero_shot

    out = []
    for name, table in raw["eval"].items():
        where = f"{path} [eval.{name}]"
        args = list(table.get("args", []))
        if given := [a for a in args if a.split("=")[0] in EVAL_SET_BY_SWEEP]:
            raise SpecError(f"{where}: {given[0]!r} is set by the sweep (the final checkpoint, lengths, and the "
                            f"run's eval/ directory)")
        lengths = ()
        if name == "extrapolation":
            if "lengths" not in table:
                raise SpecError(f"{where}: key 'lengths' is required, e.g. lengths = \"1x,2x,4x\"")
            lengths = tuple(s.strip() for s in table["lengths"].split(",") if s.strip())
            if not any(a.split("=")[0] == "--data-dir" for a in args):
                args += ["--data-dir", run.cfg.data_dir]  # the validation shard of the data it trained on
            args = ["--lengths", ",".join(lengths)] + args
        args = ["--checkpoint", str(run.final_checkpoint)] + args
        _parse_eval_args(zero_shot if name == "zero_shot" else extrapolation, args, where)
        out.append(Eval(name=name, args=tuple(args), lengths=lengths))
    return out


def resolve(run, raw, path):
    where = f"{path} {run.origin} run {run.name!r}"
    values = {**_base_values(run.base_config, where), **run.values}
    try:
        run.cfg = build_config(values, where=where)
    except ConfigError as e:
        raise SpecError(str(e)) from None
    _check_round_trip(run, where)
    run.evals = _evals(raw, path, run)
    return run


def select(names, only):
    """The names matching any of the globs in `only` (all when empty); a glob matching nothing is an error."""
    if not only:
        return list(names)
    for glob in only:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise SpecError(f"--only {glob!r} matches no run (runs: {', '.join(names[:8])}"
                            f"{', ...' if len(names) > 8 else ''})")
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in only)]


def parse_setting(text):
    """'key=value' (a command-line --set) -> (key, value). A config key's value is read by config.parse_value, as
    train.py reads it; a TOML list ([1, 2], ["rope", "alibi"]) is a list of values, as in the spec file (an axis);
    size and config take a name or path (quoted or not), or a list of them."""
    where = f"--set {text!r}"
    try:
        key, value = split_setting(text, where)
        literal = toml_literal(value.strip())
        if isinstance(literal, list):
            return key, literal
        if key in SELECTORS:
            return key, literal if isinstance(literal, str) else value.strip()
        return key, parse_value(key, value, where)
    except ConfigError as e:
        raise SpecError(str(e)) from None


def apply_settings(raw, settings):
    """--set key=value for every run: replaces the grid key (an axis keeps its place in names, with one value);
    a list value makes the key an axis of those values."""
    for text in settings:
        key, value = parse_setting(text)
        if key in SET_BY_SWEEP:
            raise SpecError(f"--set {text!r}: {key!r} is set by the sweep ({SET_BY_SWEEP[key]})")
        axis = isinstance(raw["grid"].get(key), list) and not isinstance(value, list)
        raw["grid"][key] = [value] if axis else value


def load_spec(path, out_root=None, only=(), settings=()):
    """The spec at `path` with its selected runs (`only`: name globs) resolved and validated; `settings`:
    'key=value' strings applied to every run (parse_setting)."""
    path = Path(path).resolve()
    raw = read_spec(path)
    apply_settings(raw, settings)
    root = Path(out_root or raw.get("out_root") or f"out/{path.stem}").expanduser().resolve()
    planned = plan(raw, path, root)
    names = [r.name for r in planned]
    chosen = set(select(names, only))
    runs = [resolve(r, raw, path) for r in planned if r.name in chosen]
    return Spec(path=path, description=raw.get("description", ""), out_root=root, resources=_resources(raw, path),
                runs=runs, all_names=names)
