"""
Run a sweep on this machine, one run after another (CPU studies, a single GPU).

Each step is a subprocess started from the repository root with this interpreter (so the same environment):
`python -m train BASE --key=value ... --out_dir=RUN_DIR`, then `python -m eval.<name> --checkpoint FINAL ...` for
each chained evaluation. Their output is appended to RUN_DIR/local.log and, unless quiet, echoed prefixed with the
run's name.

Per run: done (state.is_done) -> skipped, its directory untouched. Otherwise sweep.json (and, for a new directory,
config.json) is written, train.py runs unless training is finished (it resumes from the newest checkpoint, so an
unfinished or interrupted run continues rather than restarts), then each evaluation whose output is missing. A run
directory holding another config is refused before anything starts. A failed run is reported and the sweep goes on
with the next one.
"""

import shlex
import subprocess
import sys
import time

from sweeps import state
from sweeps.results import last_val_loss
from sweeps.spec import REPO, SpecError


def _run_logged(argv, log_path, prefix, quiet):
    """Run argv from the repository root; its output goes to log_path (appended) and, unless quiet, to stdout."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            log.write(line)
            log.flush()  # the log is what one watches (tail -f) during a long local sweep
            if not quiet:
                print(f"{prefix}{line}", end="", flush=True)
        return proc.wait()


def _duration(seconds):
    return f"{seconds:.0f}s" if seconds < 60 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _run_one(run, spec, tag, quiet):
    """Train (if not finished) and evaluate (what is missing); None on success, else what failed."""
    state.write_run_files(run, spec.path)
    log = run.out_dir / "local.log"
    prefix = f"    {run.name} | "
    t = state.training(run.out_dir, run.total_steps)
    if not t.finished:
        where = f"resuming at step {t.step}" if t.step else "from scratch"
        print(f"{tag}: training to step {t.total} ({where}); log {log}", flush=True)
        code = _run_logged([sys.executable, *run.train_args()], log, prefix, quiet)
        t = state.training(run.out_dir, run.total_steps)
        if code != 0 or not t.finished:
            return f"train.py exited with status {code} at step {t.step}/{t.total}"
    for ev in state.pending_evals(run):
        print(f"{tag}: {ev.name}", flush=True)
        code = _run_logged(ev.argv(sys.executable), log, prefix, quiet)
        if code != 0 or not state.eval_done(run.out_dir, ev.name, run.total_steps, ev.lengths):
            return f"{ev.name} exited with status {code}"
    return None


def run_all(spec, quiet=False):
    """Run the spec's runs in order; returns {"completed": [...], "skipped": [...], "failed": [(name, why)]}."""
    conflicts = [f"  {r.name}: {why}" for r in spec.runs if (why := state.conflict(r))]
    if conflicts:
        raise SpecError("run directories that hold other runs (nothing was started):\n" + "\n".join(conflicts))
    summary = {"completed": [], "skipped": [], "failed": []}
    start, n = time.time(), len(spec.runs)
    for i, run in enumerate(spec.runs, 1):
        tag = f"[{i}/{n}] {run.name}"
        if state.is_done(run):
            print(f"{tag}: skipped (done)", flush=True)
            summary["skipped"].append(run.name)
            continue
        t0 = time.time()
        problem = _run_one(run, spec, tag, quiet)
        if problem:
            print(f"{tag}: FAILED after {_duration(time.time() - t0)}: {problem} (see {run.out_dir / 'local.log'})",
                  flush=True)
            summary["failed"].append((run.name, problem))
            continue
        val = last_val_loss(run.out_dir)
        print(f"{tag}: done in {_duration(time.time() - t0)}" + (f", val loss {val:.4f}" if val is not None else ""),
              flush=True)
        summary["completed"].append(run.name)
    print(f"{n} runs in {_duration(time.time() - start)}: {len(summary['completed'])} completed, "
          f"{len(summary['skipped'])} skipped (done), {len(summary['failed'])} failed", flush=True)
    for name, problem in summary["failed"]:
        print(f"  failed: {name}: {problem}")
    return summary
