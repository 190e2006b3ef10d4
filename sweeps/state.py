"""
What a run directory holds, read only from the files that train.py and the evaluations write:

    training       the newest complete ckpt_* (checkpoint.list_checkpoints) and its meta.json (step, reason, time);
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

EXIT_FINISHED, EXIT_OTHER, EXIT_TIME_LIMIT, EXIT_TERMINATED = 0, 1, 3, 4


@dataclass
class Training:
    step: int  # of the newest complete checkpoint (0: none)
    total: int
    reason: str = ""  # why that checkpoint was saved: periodic, final, signal SIGUSR1, ...
    time: float = 0.0  # when (meta.json's epoch seconds)

    @property
    def finished(self):
        return self.step >= self.total


def training(out_dir, total):
    found = ckpt.list_checkpoints(out_dir)
    if not found:
        return Training(step=0, total=total)
    step, path = found[-1]
    meta = ckpt.load_meta(path)
    return Training(step=step, total=total, reason=meta.get("reason", ""), time=meta.get("time", 0.0))


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
    if config_file.is_file():
        saved.append((json.loads(config_file.read_text()), str(run.out_dir)))
    latest = ckpt.latest_checkpoint(run.out_dir)
    if latest is not None:
        saved.append((ckpt.load_meta(latest)["config"], str(latest)))
    try:
        for config, where in saved:
            check_resume_config(config, run.cfg, where)
    except ConfigError as e:
        return str(e)
    return None


def describe(run):
    """A short status: new, unfinished (step k/n), trained (evals pending), done; or the conflict."""
    if problem := conflict(run):
        return f"conflict: {problem}"
    t = training(run.out_dir, run.total_steps)
    if not t.finished:
        return f"unfinished (step {t.step}/{t.total})" if t.step else "new"
    pending = pending_evals(run)
    return f"trained, evals pending: {', '.join(e.name for e in pending)}" if pending else "done"


def is_done(run):
    return training(run.out_dir, run.total_steps).finished and not pending_evals(run)


def write_run_files(run, spec_path):
    """config.json (only into a new directory: train.py keeps it afterwards) and sweep.json, before a launch."""
    run.out_dir.mkdir(parents=True, exist_ok=True)
    config_file = run.out_dir / "config.json"
    if not config_file.exists():
        config_file.write_text(json.dumps(run.cfg.resolved_dict(), indent=1, sort_keys=True))
    record = dict(name=run.name, spec=str(spec_path), origin=run.origin, axes=run.axes, total_steps=run.total_steps,
                  train=run.train_args(), evals=[dict(name=e.name, args=list(e.args), lengths=list(e.lengths))
                                                 for e in run.evals])
    (run.out_dir / "sweep.json").write_text(json.dumps(record, indent=1))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m sweeps.state", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--since", type=float, default=None, help="epoch seconds (the batch job's start)")
    p.add_argument("--eval", default=None, help="check this evaluation instead of training")
    args = p.parse_args(argv)
    record_file = Path(args.run_dir) / "sweep.json"
    if not record_file.is_file():
        print(f"error: {record_file} not found (written by scripts/sweep.py before a launch)", file=sys.stderr)
        return 2
    record = json.loads(record_file.read_text())
    if args.eval is not None:
        evals = {e["name"]: e for e in record["evals"]}
        if args.eval not in evals:
            print(f"error: {args.run_dir} chains no evaluation {args.eval!r} ({', '.join(evals)})", file=sys.stderr)
            return 2
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


if __name__ == "__main__":
    sys.exit(main())
