"""
What a run directory holds, read only from the files that train.py and the evaluations write:

    training       the newest ckpt_* (checkpoint.list_checkpoints) with a readable meta.json (step, reason, time; a
                   newer one whose meta.json is missing or damaged is named in the status, never deleted);
                   finished when its step reaches config.total_steps(config), the test train.py itself applies
    zero_shot      eval/<final checkpoint>_zero_shot_*.json (eval/zero_shot.py), valid JSON
    extrapolation  eval/extrapolation_*.json (eval/extrapolation.py) holding the final checkpoint of this run,
                   evaluated at the lengths asked for

A run is done when training is finished and each chained evaluation is. An output that is not valid JSON does not
count (eval/extrapolation.py claims its file name before it computes, so a killed evaluation leaves an empty one).
A run directory that holds a run with another config (config.check_resume_config: only max_steps, intervals, device
and the like may change) is a conflict: the sweep refuses it instead of launching train.py into it.

Before a launch the sweep writes two files into the run directory: config.json (the resolved config, as train.py
writes it; only when the directory is new) and sweep.json (name, spec, total steps, the train.py command, the
evaluations). The command line below reads sweep.json; the batch scripts (slurm.py) call it from the repository
root:

    python -m sweeps.state RUN_DIR [--since EPOCH]   exit 0: training finished
                                                     3: stopped early by SIGUSR1 after EPOCH (the time-limit warning;
                                                        the job requeues itself)
                                                     4: stopped early by SIGTERM after EPOCH (pre-emption: Slurm
                                                        requeues pre-empted jobs; scancel: nothing to do)
                                                     1: anything else (not started, crashed, killed)
    python -m sweeps.state RUN_DIR --eval NAME       exit 0 when evaluation NAME is done, 1 when not
"""

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import checkpoint as ckpt
from config import ConfigError, check_resume_config
from durable import atomic_write_text
from errors import UserError, exit_status
from lockfile import DirectoryLock

EXIT_FINISHED, EXIT_OTHER, EXIT_TIME_LIMIT, EXIT_TERMINATED = 0, 1, 3, 4


class RunDirError(UserError, ValueError):
    """A run directory's file that the sweep reads is missing or unreadable."""


def read_json(path, what):
    """The JSON value in `path`; RunDirError naming the file and `what` it should hold when it is missing or not
    valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} not found (expected {what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: not valid JSON ({e}); expected {what}") from None
    except OSError as e:
        raise RunDirError(f"{path}: cannot be read ({e.strerror}); expected {what}") from None


def _checkpoint_meta(path):
    """(meta.json's dict, None) of a checkpoint directory with a readable meta.json, else (None, why not). Only
    meta.json is read: what the sweep decides (step, reason, config) is there; train.py verifies the rest."""
    try:
        meta = read_json(path / "meta.json", "the checkpoint's meta.json")
    except RunDirError as e:
        return None, str(e)
    return (meta, None) if isinstance(meta, dict) else (None, "meta.json does not hold a JSON object")


def newest_readable_checkpoint(out_dir):
    """(step, path, meta) of the newest ckpt_* in out_dir with a readable meta.json (None when there is none), and
    [(path, why)] of the newer ones passed over: a damaged checkpoint is reported, never deleted."""
    skipped = []
    for step, path in reversed(ckpt.list_checkpoints(out_dir)):
        meta, why = _checkpoint_meta(path)
        if meta is not None:
            return (step, path, meta), skipped
        skipped.append((path, why))
    return None, skipped


@dataclass
class Training:
    step: int  # of the newest readable checkpoint (0: none)
    total: int
    reason: str = ""  # why that checkpoint was saved: periodic, final, signal SIGUSR1, ...
    time: float = 0.0  # when (meta.json's epoch seconds)
    skipped: tuple = ()  # (path, why) of newer checkpoints that could not be read

    @property
    def finished(self):
        return self.step >= self.total


def training(out_dir, total):
    newest, skipped = newest_readable_checkpoint(out_dir)
    if newest is None:
        return Training(step=0, total=total, skipped=tuple(skipped))
    step, _, meta = newest
    return Training(step=step, total=total, reason=meta.get("reason", ""), time=meta.get("time", 0.0),
                    skipped=tuple(skipped))


def _json_files(directory, pattern):
    for path in sorted(Path(directory).glob(pattern)):
        try:
            yield path, json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue  # an evaluation still running, or killed before it wrote its result


def eval_done(out_dir, name, total, lengths=()):
    """Whether evaluation `name` has a complete output for the final checkpoint (step `total`) of out_dir."""
    out_dir, final = Path(out_dir).resolve(), ckpt.checkpoint_name(total)
    if name == "zero_shot":
        return any("tasks" in rec for _, rec in _json_files(out_dir / "eval", f"{final}_zero_shot_*.json"))
    if name == "extrapolation":
        for _, rec in _json_files(out_dir / "eval", "extrapolation_*.json"):
            if rec.get("lengths") == list(lengths) and any(
                    Path(c.get("path", "")).resolve() == out_dir / final for c in rec.get("checkpoints", [])):
                return True
        return False
    raise ValueError(f"unknown evaluation {name!r}")


def pending_evals(run):
    return [e for e in run.evals if not eval_done(run.out_dir, e.name, run.total_steps, e.lengths)]


def conflict(run):
    """None, or why run.out_dir cannot take this run (it holds one with a different config)."""
    saved = []
    config_file = run.out_dir / "config.json"
    try:
        if config_file.exists():
            saved.append((read_json(config_file, "the run's resolved config (train.py writes it)"), str(run.out_dir)))
        newest, _ = newest_readable_checkpoint(run.out_dir)
        if newest is not None:
            if not isinstance(newest[2].get("config"), dict):
                return f"{newest[1] / 'meta.json'}: no 'config' entry (expected the config the checkpoint was saved with)"
            saved.append((newest[2]["config"], str(newest[1])))
        for config, where in saved:
            if not isinstance(config, dict):
                return f"{where}: config.json does not hold a JSON object"
            check_resume_config(config, run.cfg, where)
    except (ConfigError, RunDirError) as e:
        return str(e)
    return None


def describe(run):
    """A short status: new, unfinished (step k/n), trained (evals pending), done; or the conflict."""
    if problem := conflict(run):
        return f"conflict: {problem}"
    t = training(run.out_dir, run.total_steps)
    damaged = "".join(f"; {path.name} unreadable: {why}" for path, why in t.skipped)
    if not t.finished:
        return (f"unfinished (step {t.step}/{t.total}{damaged})" if t.step else f"new{damaged}")
    pending = pending_evals(run)
    status = f"trained, evals pending: {', '.join(e.name for e in pending)}" if pending else "done"
    return status + damaged


def is_done(run):
    return training(run.out_dir, run.total_steps).finished and not pending_evals(run)


def write_run_files(run, spec_path, also=()):
    """config.json (only into a new directory: train.py keeps it afterwards), sweep.json, and `also` ((path, text)
    pairs, e.g. the batch script), before a launch. Every file is written atomically, under the run directory's
    lock (lockfile.DirectoryLock: refused while a training or another sweep holds it), which is released on
    return, before the caller starts train.py, since train.py locks its out_dir with the same lock file."""
    try:
        run.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run directory {run.out_dir} cannot be created ({e.strerror})") from None
    record = dict(name=run.name, spec=str(spec_path), origin=run.origin, axes=run.axes, total_steps=run.total_steps,
                  train=run.train_args(), evals=[dict(name=e.name, args=list(e.args), lengths=list(e.lengths))
                                                 for e in run.evals])
    with DirectoryLock(run.out_dir, "scripts/sweep.py writing the run files"):
        config_file = run.out_dir / "config.json"
        if not config_file.exists():
            atomic_write_text(config_file, json.dumps(run.cfg.resolved_dict(), indent=1, sort_keys=True))
        atomic_write_text(run.out_dir / "sweep.json", json.dumps(record, indent=1))
        for path, text in also:
            atomic_write_text(path, text)


def _main(argv):
    p = argparse.ArgumentParser(prog="python -m sweeps.state", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--since", type=float, default=None, help="epoch seconds (the batch job's start)")
    p.add_argument("--eval", default=None, help="check this evaluation instead of training")
    args = p.parse_args(argv)
    record_file = Path(args.run_dir) / "sweep.json"
    record = read_json(record_file, "the run's record, written by scripts/sweep.py before a launch")
    if not isinstance(record, dict) or not {"name", "total_steps", "evals"} <= set(record):
        raise RunDirError(f"{record_file}: expected an object with name, total_steps and evals (written by "
                          f"scripts/sweep.py)")
    if args.eval is not None:
        evals = {e["name"]: e for e in record["evals"]}
        if args.eval not in evals:
            raise RunDirError(f"{args.run_dir} chains no evaluation {args.eval!r} ({', '.join(evals)})")
        done = eval_done(args.run_dir, args.eval, record["total_steps"], evals[args.eval]["lengths"])
        print(f"{record['name']}: {args.eval} {'done' if done else 'pending'}")
        return 0 if done else 1
    t = training(args.run_dir, record["total_steps"])
    print(f"{record['name']}: step {t.step}/{t.total}" + (f", last checkpoint: {t.reason}" if t.reason else ""))
    if t.finished:
        return EXIT_FINISHED
    if args.since is not None and t.time >= args.since and t.reason.startswith("signal"):
        return EXIT_TERMINATED if "SIGTERM" in t.reason else EXIT_TIME_LIMIT
    return EXIT_OTHER


def main(argv=None):
    """Exit statuses as in the module docstring; 2 with one error line for a missing or unreadable sweep.json."""
    return exit_status(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
