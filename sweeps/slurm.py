"""
One SLURM batch script per run, and submission with sbatch.

What a script does, in order:
  1. #SBATCH lines from the spec's [resources]: --nodes, --ntasks-per-node=1 (one torchrun per node),
     --gpus-per-node, --cpus-per-task, --time, --partition, --account, --qos, --mem, the job name (= run name),
     --output into the run directory with --open-mode=append (a requeued job continues the same log), --requeue,
     --signal=USR1@<signal_seconds>, then the spec's extra options.
  2. cd to the repository, the spec's setup lines (modules, venv), HEAD_NODE = the first host of the allocation.
  3. srun --ntasks-per-node=1 --cpus-per-task=N (srun no longer inherits sbatch's) torchrun --nnodes=$SLURM_NNODES
     --nproc_per_node=<gpus> --rdzv_backend=c10d --rdzv_endpoint=$HEAD_NODE:<port> --rdzv_id=$SLURM_JOB_ID
     -m train BASE --key=value ... --out_dir=RUN_DIR: one torchrun per node, all meeting at HEAD_NODE. train.py
     resumes from the newest checkpoint in RUN_DIR, so a requeued job continues where the last one stopped.
  4. python -m sweeps.state RUN_DIR --since JOB_START decides what happened (see state.py):
     finished -> the evaluations; stopped by SIGUSR1 -> scontrol requeue (the time limit is near; Slurm does not
     requeue jobs that reach their limit); stopped by SIGTERM -> nothing (a pre-empted job is requeued by Slurm
     itself thanks to --requeue; a cancelled one should stay cancelled); anything else -> exit 1 (a crash is not
     retried forever).
  5. Each chained evaluation on the final checkpoint, skipped when its output already exists, so evaluations run
     only once training has finished and a requeue repeats none of them.

Signals. train.py saves a checkpoint at the end of the current step and exits 0 on SIGUSR1 or SIGTERM.
`--signal=USR1@N` (no "B:") makes Slurm signal the job steps, not the batch shell: slurmstepd signals every process
of the srun step (the whole container under proctrack/cgroup), so the training ranks receive SIGUSR1 directly.
torchrun is in that step too, and SIGUSR1's default action would kill it, ending the step and with it the ranks in
the middle of their checkpoint. So torchrun runs with --signals-to-handle=...,SIGUSR1, which makes it forward the
signal to its workers and wait up to --shutdown-timeout (= signal_seconds) for them to exit. The ranks may get the
signal twice (from Slurm and from torchrun); train.py only sets a flag, so that is harmless. Signalling the batch
shell instead ("B:USR1") would need the shell to forward the signal with scancel, which again reaches torchrun and
not its children unless proctrack signals the whole step; the step signal is simpler. On pre-emption or scancel
Slurm sends SIGTERM to every process: torchrun forwards it (SIGTERM is in its default set), the ranks checkpoint
within the grace time, and the batch shell traps SIGTERM so that it keeps waiting for srun instead of dying first.
The checkpoint itself is collective (train.save: every rank passes a barrier after the atomic rename), so by the
time any rank exits the checkpoint is complete, and srun's --kill-on-bad-exit (torchrun exits non-zero after a
signal) cannot cut one short; it does stop the other nodes promptly after a crash.
"""

import getpass
import shlex
import shutil
import subprocess
from pathlib import Path

from durable import atomic_write_text
from errors import UserError
from sweeps.spec import REPO, display_path

HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun's default set plus the time-limit warning


class SlurmError(UserError, RuntimeError):
    pass


def sbatch_options(run, res):
    opts = [f"--job-name={run.name}", f"--nodes={res.nodes}", "--ntasks-per-node=1",
            f"--gpus-per-node={res.gpus_per_node}"]
    for key, flag in (("cpus_per_task", "--cpus-per-task"), ("time", "--time"), ("partition", "--partition"),
                      ("account", "--account"), ("qos", "--qos"), ("mem", "--mem")):
        value = getattr(res, key)
        if value not in ("", 0):
            opts.append(f"{flag}={value}")
    opts += [f"--output={run.out_dir}/slurm-%j.out", "--open-mode=append", "--requeue",
             f"--signal=USR1@{res.signal_seconds}", *res.sbatch]
    return opts


def _wrap(argv, indent):
    """A shell command over several lines: the program and its positional words first, then one --option (with
    its value, if separate) per line."""
    lines = []
    for word in map(shlex.quote, argv):
        if word.startswith("--") or not lines:
            lines.append(word)
        else:
            lines[-1] += " " + word
    return f" \\\n{indent}".join(lines)


def render(run, spec):
    """The batch script's text for one resolved run."""
    res = spec.resources
    if any(c.isspace() for c in str(run.out_dir)):
        raise SlurmError(f"{run.out_dir}: #SBATCH --output cannot hold a path with spaces; choose another out_root")
    # srun does not inherit sbatch's --cpus-per-task (Slurm >= 22.05): without it the step gets one CPU per task
    cpus = f" --cpus-per-task={res.cpus_per_task}" if res.cpus_per_task else ""
    launcher = [f'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1{cpus} --kill-on-bad-exit=1',
                f'    torchrun --nnodes="$SLURM_NNODES" --nproc_per_node={res.gpus_per_node}',
                f'    --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:{res.rdzv_port}" --rdzv_id="$SLURM_JOB_ID"',
                f"    --signals-to-handle={HANDLED_SIGNALS} --shutdown-timeout={res.signal_seconds}",
                "    " + _wrap(run.train_args(), "        ")]
    train = " \\\n".join(launcher)
    lines = ["#!/bin/bash",
             f"# {run.name}: written by scripts/sweep.py from {display_path(spec.path)}; re-run the sweep to rewrite "
             f"it.",
             *(f"#SBATCH {o}" for o in sbatch_options(run, res)),
             "",
             "set -uo pipefail  # not -e: what training did is read from its checkpoints below",
             f"cd {shlex.quote(str(REPO))}",
             *res.setup,
             f"RUN_DIR={shlex.quote(str(run.out_dir))}",
             "JOB_START=$(date +%s)",
             'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
             'echo "$(date -u +%FT%TZ) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on '
             f'$SLURM_JOB_NODELIST, rendezvous $HEAD_NODE:{res.rdzv_port}"',
             "",
             "# Training (resumes from the newest checkpoint in RUN_DIR). In the background so that the trap below",
             "# can keep this shell alive on SIGTERM until the ranks have checkpointed.",
             train + " &",
             "TRAIN_PID=$!",
             "trap 'echo \"$(date -u +%FT%TZ) SIGTERM: waiting for training to checkpoint\"' TERM",
             'wait "$TRAIN_PID"; TRAIN_STATUS=$?',
             'while kill -0 "$TRAIN_PID" 2>/dev/null; do wait "$TRAIN_PID"; TRAIN_STATUS=$?; done',
             "trap - TERM",
             "",
             'python -m sweeps.state "$RUN_DIR" --since "$JOB_START"',
             "case $? in",
             "    0) ;;",
             '    3) echo "stopped before the time limit; requeueing job $SLURM_JOB_ID"',
             '       scontrol requeue "$SLURM_JOB_ID"; exit 0 ;;',
             '    4) echo "terminated (pre-emption: Slurm requeues the job; scancel: it stays cancelled)"; exit 0 ;;',
             '    *) echo "training did not finish (srun exit status $TRAIN_STATUS)"; exit 1 ;;',
             "esac",
             ""]
    if run.evals:
        lines += ["# Evaluations of the final checkpoint; each is skipped when its output exists.", "EVAL_STATUS=0"]
        for ev in run.evals:
            lines.append(f'python -m sweeps.state "$RUN_DIR" --eval {ev.name} || \\\n    '
                         + _wrap(ev.argv(), "        ") + " || EVAL_STATUS=1")
        lines.append('exit "$EVAL_STATUS"')
    return "\n".join(lines) + "\n"


def script_path(run, directory):
    return Path(directory) / f"{run.name}.sbatch"


def check_script_target(path, text, force=False):
    """Raise SlurmError unless `text` may be written to `path`: the path is free, already holds exactly `text`, or
    `force` allows replacing what it holds (a hand-edited script is never replaced silently)."""
    path = Path(path)
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise SlurmError(f"{parent} is a file; expected a directory for the batch script {path.name}")
            break
    if not path.exists():
        return
    if not path.is_file():
        raise SlurmError(f"{path} exists and is not a file; expected the batch script of run {path.stem}")
    if not force and path.read_bytes() != text.encode():
        raise SlurmError(f"{path} differs from the batch script the sweep would write (edited by hand, or written "
                         f"from another spec); move it away, or pass --force to replace it")


def write_script_text(path, text):
    """Write the batch script `text` to `path` atomically (an identical file is left as it is), executable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.is_file() and path.read_bytes() == text.encode()):
        atomic_write_text(path, text)
    path.chmod(0o755)
    return path


def _require(program):
    if shutil.which(program) is None:
        raise SlurmError(f"{program} not found on PATH: submitting needs a SLURM login node. Use --dry-run --out DIR "
                         f"to write the batch scripts, or --local to run the sweep on this machine")


def check_available():
    _require("sbatch")
    _require("squeue")


def queued_scripts():
    """{batch script path: job id} of this user's pending and running jobs, so that no run is submitted twice."""
    out = subprocess.run(["squeue", "--noheader", f"--user={getpass.getuser()}", "--format=%i|%o"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SlurmError(f"squeue failed: {out.stderr.strip()}")
    jobs = {}
    for line in out.stdout.splitlines():
        job, _, command = line.strip().partition("|")
        if command:
            jobs[str(Path(command.split()[0]).resolve())] = job
    return jobs


def submit(script):
    """sbatch the script; the job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SlurmError(f"sbatch {script} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]
