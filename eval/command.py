"""
What the evaluation commands (eval.extrapolation, eval.passkey, eval.zero_shot) share around their own work: the
flags that name checkpoints and load a model, checkpoint labels, the files a result goes to, and the command's tail.

Output names: <out dir>/<name>_<UTC time YYYYmmdd-HHMMSS>[_k] for the first k = 1, 2, ... whose files are all
free, the first file created exclusively, so concurrent commands never share a name and nothing existing is
overwritten. The out dir defaults to <run dir>/eval, next to the checkpoint directories (not inside them: training
prunes old checkpoint directories).

Exit status: 0, or 2 with one line "error: ..." on stderr for bad input (every error that names a bad checkpoint,
data directory, flag value or task is an errors.UserError: EvalError here, checkpoint.CheckpointError,
config.ConfigError, ...); any other exception is a bug and keeps its traceback.
"""

import argparse
import json
import time
from pathlib import Path

from device import DTYPES
from errors import UserError, exit_status
from eval.load import set_offline_defaults


class EvalError(UserError, ValueError):
    """A flag value, label or data that an evaluation cannot use; the message names it and what was expected."""


def checkpoints_parser(prog, description):
    """The parser of a command that evaluates one or more checkpoints: --checkpoint A [B ...], --label and --out;
    the command adds its own flags and add_model_args."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, help="ckpt_* directories or run directories")
    p.add_argument("--label", default=None, help="comma-separated names, one per checkpoint")
    p.add_argument("--out", default=None, help="output directory (default: <first run dir>/eval)")
    return p


def add_model_args(parser, override_help="GPTConfig override for every checkpoint (repeatable)"):
    """--device, --dtype and --override: how a checkpoint becomes a model (eval.load.load)."""
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help=override_help)


def checkpoint_labels(label_arg, checkpoints):
    """--label's comma-separated names, one per checkpoint; None for each when not given."""
    labels = label_arg.split(",") if label_arg else [None] * len(checkpoints)
    if len(labels) != len(checkpoints):
        raise EvalError(f"--label has {len(labels)} names for {len(checkpoints)} checkpoints")
    return labels


def default_label(summary):
    """'<pos_encoding>[+kv_shift] @ <step>' of a result's model summary (eval.load.Loaded.summary)."""
    return f"{summary['pos_encoding']}{'+kv_shift' if summary['kv_shift'] else ''} @ {summary['step']}"


def utc_time():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def unique_stem(out_dir, stem, suffixes=(".json",)):
    """out_dir/<stem>[_k] for the first k whose files <name><suffix> are all free; <name><suffixes[0]> is created
    (empty) exclusively, so concurrent callers never share a name and nothing existing is overwritten."""
    for k in range(1000):
        name = stem if k == 0 else f"{stem}_{k}"
        if any((out_dir / f"{name}{s}").exists() for s in suffixes[1:]):
            continue
        try:
            (out_dir / f"{name}{suffixes[0]}").open("x").close()
            return out_dir / name
        except FileExistsError:
            continue
    raise RuntimeError(f"no free result name for {stem} in {out_dir}")


def output_stem(out, checkpoint_dir, name, suffixes=(".json", ".png")):
    """The stem of a new result (module docstring): in `out`, or next to the checkpoint directory's run."""
    out_dir = Path(out) if out else Path(checkpoint_dir).parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    return unique_stem(out_dir, f"{name}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}", suffixes)


def write_result(result, stem, plot, indent=None):
    """<stem>.json (the result) and <stem>.png (drawn by plot(result, path)); [those two paths]."""
    json_path, png_path = Path(f"{stem}.json"), Path(f"{stem}.png")
    json_path.write_text(json.dumps(result, indent=indent))
    plot(result, png_path)
    return [json_path, png_path]


def command_main(parse_args, run, render):
    """The main(argv=None) of an evaluation command: parse argv, set the Hub offline defaults, and call run(args) ->
    (result, the files it wrote); then print render(result) and the files (exit status 0), or one error line for
    a UserError (status 2, errors.exit_status); other exceptions are bugs and propagate with their traceback."""
    def evaluate(argv):
        args = parse_args(argv)
        set_offline_defaults()
        result, written = run(args)
        print(render(result))
        print("wrote " + "\n      ".join(map(str, written)))
        return 0

    def main(argv=None):
        return exit_status(evaluate, argv)

    return main
