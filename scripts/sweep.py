"""
Expand a sweep spec (configs/sweeps/*.toml; the format is in sweeps/spec.py) into runs and launch them.

    python -m scripts.sweep SPEC --dry-run --out DIR   # one SLURM batch script per run into DIR; nothing submitted
    python -m scripts.sweep SPEC                       # write each run's script into its directory and sbatch it
    python -m scripts.sweep SPEC --local               # run them here one after another: train.py, then the evals
    python -m scripts.sweep SPEC --list                # the runs and their status, nothing written

Options: --only GLOB (repeatable; the runs whose name matches), --out-root DIR (instead of the spec's out_root),
--set KEY=VALUE (repeatable; a config value for every run, replacing the spec's, read as train.py reads --key=value;
a TOML list such as seed=[0,1] makes an axis), --out DIR (when submitting: the scripts go there instead of into the
run directories), --quiet (with --local: progress lines only; each run's full output is in RUN_DIR/local.log),
--force (replace batch scripts that differ from what the sweep would write; without it such a file, e.g. one
edited by hand, is an error naming it, and nothing is written; an identical file is left as it is).

Every selected run is resolved and validated before anything is written or started. A run that is done (training
at its last step and every chained evaluation present) is skipped and its files are left untouched; an unfinished
one resumes from its newest checkpoint; a run directory that holds a run with another config is an error. When
submitting, runs whose script is already queued or running (squeue) are not submitted again.
Exit status: 0; 1 if a local run failed; 2 for an error in the spec, a run directory or SLURM.
"""

import argparse
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file, the repository's packages would not be importable
    sys.exit("run it from the repository root as a module: python -m scripts.sweep ...")

from errors import exit_status  # noqa: E402
from sweeps import local, slurm, state  # noqa: E402
from sweeps.spec import SpecError, display_path, load_spec  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="a sweep spec, e.g. configs/sweeps/paper_tables.toml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="write the batch scripts into --out, do not submit")
    mode.add_argument("--local", action="store_true", help="run the sweep on this machine")
    mode.add_argument("--list", action="store_true", help="print the runs and their status")
    p.add_argument("--out", default=None, help="directory for the batch scripts (required with --dry-run)")
    p.add_argument("--only", action="append", default=[], metavar="GLOB", help="runs whose name matches")
    p.add_argument("--out-root", default=None, help="run directories go here instead of the spec's out_root")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config value for every run (repeatable), e.g. --set data_dir=/scratch/shards")
    p.add_argument("--quiet", action="store_true", help="--local: progress lines only")
    p.add_argument("--force", action="store_true",
                   help="replace batch scripts that differ from what the sweep writes (e.g. edited by hand)")
    args = p.parse_args(argv)
    if args.dry_run and not args.out:
        p.error("--dry-run needs --out DIR (where the batch scripts are written)")
    return args


def print_summary(spec, statuses, scripts=None):
    sizes = Counter(r.size for r in spec.runs)
    print(f"{display_path(spec.path)}: {len(spec.runs)} runs ({', '.join(f'{k} {v}' for k, v in sizes.items())}"
          f"{'' if len(spec.runs) == len(spec.all_names) else f' of {len(spec.all_names)}'}), out_root "
          f"{spec.out_root}")
    rows = [("run", "size", "pos_encoding", "kv_shift", "seed", "steps", "status")]
    for run in spec.runs:
        rows.append((run.name, run.size, run.cfg.model.pos_encoding, str(run.cfg.model.kv_shift).lower(),
                     str(run.cfg.seed), str(run.total_steps), statuses[run.name]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    if scripts:
        print(f"evaluations after training: {', '.join(e.name for e in spec.runs[0].evals) or 'none'}")


def checked_scripts(runs, spec, directory_of, force):
    """{run name: (script path, text)} for `runs`, every target checked (slurm.check_script_target) before the
    caller writes any, so that one refused file leaves all of them unwritten."""
    scripts = {}
    for run in runs:
        path, text = slurm.script_path(run, directory_of(run)), slurm.render(run, spec)
        slurm.check_script_target(path, text, force)
        scripts[run.name] = (path, text)
    return scripts


def check_out_dir(out):
    if out and Path(out).exists() and not Path(out).is_dir():
        raise SpecError(f"--out {out} is a file; expected a directory for the batch scripts")


def dry_run(spec, out, force=False):
    check_out_dir(out)
    statuses = {r.name: state.describe(r) for r in spec.runs}
    todo = [r for r in spec.runs if statuses[r.name] != "done"]
    scripts = checked_scripts(todo, spec, lambda run: out, force)
    written = [slurm.write_script_text(path, text) for path, text in scripts.values()]
    print_summary(spec, statuses, written)
    print(f"wrote {len(written)} batch scripts to {out} (not submitted; {len(spec.runs) - len(written)} done)")
    return 0


def submit_all(spec, out, force=False):
    slurm.check_available()
    check_out_dir(out)
    statuses = {r.name: state.describe(r) for r in spec.runs}
    if conflicts := [f"  {n}: {s}" for n, s in statuses.items() if s.startswith("conflict")]:
        raise SpecError("run directories that hold other runs (nothing was submitted):\n" + "\n".join(conflicts))
    queued = slurm.queued_scripts()

    def directory_of(run):
        return Path(out or run.out_dir)

    todo = [r for r in spec.runs if statuses[r.name] != "done"]
    scripts = checked_scripts([r for r in todo if str(slurm.script_path(r, directory_of(r)).resolve()) not in queued],
                              spec, directory_of, force)
    for run in spec.runs:
        if statuses[run.name] == "done":
            print(f"{run.name}: skipped (done)")
            continue
        script = slurm.script_path(run, directory_of(run))
        if str(script.resolve()) in queued:
            print(f"{run.name}: skipped (job {queued[str(script.resolve())]} is queued or running)")
            continue
        script.parent.mkdir(parents=True, exist_ok=True)
        state.write_run_files(run, spec.path, also=[scripts[run.name]])
        script.chmod(0o755)
        job = slurm.submit(script)
        with open(run.out_dir / "slurm_jobs.txt", "a") as f:
            f.write(f"{job} {script}\n")
        print(f"{run.name}: submitted job {job} ({statuses[run.name]}) {script}")
    return 0


def _main(argv):
    args = parse_args(argv)
    spec = load_spec(args.spec, out_root=args.out_root, only=args.only, settings=args.set)
    if args.list:
        print_summary(spec, {r.name: state.describe(r) for r in spec.runs})
        return 0
    if args.dry_run:
        return dry_run(spec, Path(args.out), args.force)
    if args.local:
        summary = local.run_all(spec, quiet=args.quiet)
        return 1 if summary["failed"] else 0
    return submit_all(spec, args.out, args.force)


def main(argv=None):
    """Exit status as in the module docstring: an error in the spec, a run directory or SLURM is one line, 2."""
    return exit_status(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
