"""scripts/sweep.py: the paper and official grids, validation errors, SLURM scripts, local runs that skip and resume."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import checkpoint as ckpt
from config import load_config
from sweeps import state
from sweeps.spec import SpecError, load_spec, plan, read_spec

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "configs" / "sweeps"
PAPER_MEDIUM = ["rope", "grape_m_ctx", "grape_m", "alibi", "fox", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]
PAPER_LARGE = ["rope", "grape_m_ctx", "grape_m", "alibi", "fox", "grape_ap"]
KV_SHIFT_ROWS = ["rope", "alibi", "fox", "grape_ap"]


def sweep_main(*argv):
    from scripts import sweep

    return sweep.main([str(a) for a in argv])


def expected_paper_runs():
    runs = {}
    for size, pes in (("medium", PAPER_MEDIUM), ("large", PAPER_LARGE)):
        for pe in pes + [f"{p}+kv" for p in KV_SHIFT_ROWS]:
            base, kv = pe.removesuffix("+kv"), pe.endswith("+kv")
            runs[f"{size}_{base}{'_kvshift' if kv else ''}_s42"] = (size, base, kv)
    return runs


def official_config(size, pe, kv_shift):
    """The repository's own config file for this run, resolved (out_dir aside)."""
    cfg = load_config(REPO / "configs" / size / f"{pe}{'_kvshift' if kv_shift else ''}.toml").resolved_dict()
    cfg.pop("out_dir")
    return cfg


# ------------------------------------------------------------------------------------------------ the paper's grids


def test_paper_dry_run_writes_the_23_table_runs(tmp_path, capsys):
    out, root = tmp_path / "scripts", tmp_path / "runs"
    assert sweep_main(SWEEPS / "paper_tables.toml", "--dry-run", "--out", out, "--out-root", root) == 0
    printed = capsys.readouterr().out
    assert "23 runs (medium 13, large 10)" in printed and "wrote 23 batch scripts" in printed
    expected = expected_paper_runs()
    assert len(expected) == 23
    scripts = sorted(out.glob("*.sbatch"))
    assert {p.stem for p in scripts} == set(expected)
    assert sum(name.startswith("medium_grape_a_") for name in expected) == 3
    assert not root.exists()  # a dry run writes only the scripts
    for path in scripts:
        size, pe, kv = expected[path.stem]
        text = path.read_text()
        sbatch = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
        for line in (f"--job-name={path.stem}", "--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=8",
                     "--cpus-per-task=64", "--time=24:00:00", "--requeue", "--signal=USR1@300",
                     "--open-mode=append", f"--output={root / path.stem}/slurm-%j.out", "--exclusive"):
            assert line in sbatch, (path.name, line)
        assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
        launch = re.search(r"^srun .*?&$", text, flags=re.M | re.S).group(0)
        assert launch.startswith('srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=64 ')
        for piece in ('torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=8', "--rdzv_backend=c10d",
                      '--rdzv_endpoint="$HEAD_NODE:29500"', '--rdzv_id="$SLURM_JOB_ID"', "SIGUSR1",
                      f"-m train configs/base/{size}.toml", f"--pos_encoding={pe}",
                      f"--kv_shift={'true' if kv else 'false'}", "--seed=42", "--data_seed=42",
                      f"--out_dir={root / path.stem}"):
            assert piece in launch, (path.name, piece)
        assert 'scontrol requeue "$SLURM_JOB_ID"' in text
        final = root / path.stem / "ckpt_0025000"
        chain = text[text.index("# Evaluations"):]
        assert f"python -m eval.zero_shot \\\n        --checkpoint {final}" in chain
        assert f"python -m eval.extrapolation \\\n        --checkpoint {final}" in chain
        assert text.index("python -m sweeps.state \"$RUN_DIR\" --since") < text.index("# Evaluations")


def test_paper_and_official_runs_are_the_repository_configs(tmp_path):
    paper = load_spec(SWEEPS / "paper_tables.toml", out_root=tmp_path)
    official = load_spec(SWEEPS / "official_configs.toml", out_root=tmp_path)
    assert len(paper.runs) == 23 and len(official.runs) == 30
    files = [(size, p.stem) for size in ("medium", "large") for p in (REPO / "configs" / size).glob("*.toml")]
    assert {r.name for r in official.runs} == {f"{size}_{stem}_s42" for size, stem in files}
    assert {r.name for r in paper.runs} <= {r.name for r in official.runs}
    for run in official.runs:
        cfg = run.cfg.resolved_dict()
        assert cfg.pop("out_dir") == str(tmp_path / run.name)
        assert cfg == official_config(run.size, run.cfg.model.pos_encoding, run.cfg.model.kv_shift), run.name


@pytest.mark.parametrize("name", sorted(p.name for p in SWEEPS.glob("*.toml")))
def test_every_shipped_spec_resolves(tmp_path, name):
    spec = load_spec(SWEEPS / name, out_root=tmp_path)
    assert spec.runs and len({r.name for r in spec.runs}) == len(spec.runs)
    assert all(r.out_dir.parent == tmp_path and r.final_checkpoint.parent == r.out_dir for r in spec.runs)


def test_quickstart_compares_four_encodings_on_bytes_over_two_seeds_to_8x(tmp_path):
    """The README's main job: RoPE, ALiBi, FoX, GRAPE-AP x 2 seeds on the byte shards, loss to 8x, no zero-shot
    (a byte-level model cannot read GPT-2 tokens)."""
    spec = load_spec(SWEEPS / "quickstart.toml", out_root=tmp_path)
    assert sorted((r.cfg.model.pos_encoding, r.cfg.seed) for r in spec.runs) == \
           sorted((pe, s) for pe in ("rope", "alibi", "fox", "grape_ap") for s in (0, 1))
    for run in spec.runs:
        assert run.cfg.data_dir == "data/shards/sample_bytes" and run.cfg.model.vocab_size == 320
        assert run.cfg.data_seed == run.cfg.seed and run.total_steps == spec.runs[0].total_steps
        assert [(e.name, e.lengths) for e in run.evals] == [("extrapolation", ("1x", "2x", "4x", "8x"))]


def test_mini_study_has_14_configurations_by_3_seeds(tmp_path):
    """Expanded without resolving (pope and rope_id are resolved only where model.py accepts them)."""
    from model import GPTConfig

    raw = read_spec(SWEEPS / "mini_study.toml")
    runs = plan(raw, SWEEPS / "mini_study.toml", tmp_path)
    configs = {(r.values["pos_encoding"], r.values.get("kv_shift", False)) for r in runs}
    pes = ["rope", "alibi", "fox", "grape_m", "grape_m_ctx", "grape_a_qk", "grape_ap", "pope", "rope_id", "nope"]
    assert configs == {(p, False) for p in pes} | {(p, True) for p in KV_SHIFT_ROWS}
    assert sorted(r.values["seed"] for r in runs) == sorted([0, 1, 2] * 14)
    assert all(r.values["data_seed"] == r.values["seed"] for r in runs)
    assert len({r.name for r in runs}) == 42
    accepted = []
    for pe in pes:
        try:
            GPTConfig(pos_encoding=pe)
            accepted.append(pe)
        except ValueError:
            pass
    spec = load_spec(SWEEPS / "mini_study.toml", out_root=tmp_path,
                     only=[f"tiny_{pe}_*" for pe in accepted])
    steps = {r.total_steps for r in spec.runs}
    assert len(spec.runs) == 3 * (len(accepted) + len(set(accepted) & set(KV_SHIFT_ROWS))) and len(steps) == 1
    for run in spec.runs:
        assert run.cfg.model.block_size == 256 and run.cfg.data_seed == run.cfg.seed
        assert [e.lengths for e in run.evals] == [("1x", "2x", "4x", "8x")]


# --------------------------------------------------------------------------------------------------------- errors


def write_spec(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text + f'\n[sizes]\ntiny = "{REPO / "configs" / "tiny" / "base.toml"}"\n')
    return path


@pytest.mark.parametrize("text, needles", [
    ('gird = 1\n[grid]\nsize = ["tiny"]\n', ["unknown key 'gird'", "allowed: description, out_root"]),
    ('[grid]\nsize = ["tiny"]\n[resources]\ngpu = 8\n', ["[resources]", "unknown key 'gpu'", "gpus_per_node"]),
    ('[grid]\nsize = ["tiny"]\nlearning_rat = 0.1\n', ["unknown key 'learning_rat'", "did you mean 'learning_rate'",
                                                       "training keys:"]),
    ('[grid]\nsize = ["tiny"]\npos_encoding = ["rope", "rop"]\n', ["run 'tiny_rop_s42'", "'rop'", "'alibi'"]),
    ('[grid]\nsize = ["tiny"]\nseed = ["a"]\n', ["key 'seed' must be int", "'a'"]),
    ('[grid]\nsize = ["tiny", "huge"]\n', ["size 'huge' is not in [sizes]", "sizes: tiny"]),
    ('[grid]\nsize = ["tiny"]\nout_dir = "x"\n', ["key 'out_dir' is set by the sweep"]),
    ('[grid]\nsize = ["tiny"]\n[[exclude]]\nkvshift = true\n', ["[[exclude]] 1", "'kvshift' is not a grid key"]),
    ('[grid]\nsize = ["tiny"]\n[eval.extrapolation]\nlengths = "1x"\nargs = ["--tokenz", "5"]\n',
     ["[eval.extrapolation]", "--tokenz"]),
])
def test_spec_errors_name_the_file_the_key_and_what_is_allowed(tmp_path, capsys, text, needles):
    path = write_spec(tmp_path, text)
    assert sweep_main(path, "--list", "--out-root", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert str(path) in err
    for needle in needles:
        assert needle in err, (needle, err)


def test_same_name_with_different_values_is_an_error(tmp_path):
    path = write_spec(tmp_path, '[grid]\nsize = ["tiny"]\n[[include]]\nlearning_rate = 1e-2\n[[include]]\n'
                                'learning_rate = 2e-2\nsize = "tiny"\n')
    runs = {r.name for r in load_spec(path, out_root=tmp_path).runs}
    assert runs == {"tiny_rope_s42", "tiny_rope_learning_rate-0.01_s42", "tiny_rope_learning_rate-0.02_s42"}
    path = write_spec(tmp_path, '[grid]\nsize = ["tiny"]\nlearning_rate = 1e-3\n[[include]]\nsize = ["tiny"]\n')
    assert len(load_spec(path, out_root=tmp_path).runs) == 1  # the include repeats the grid run: one run
    path = write_spec(tmp_path, '[grid]\nsize = ["tiny"]\n[[include]]\nsize = "tiny"\nmax_steps = 7\n'
                                '[[include]]\nsize = "tiny"\nmax_steps = 8\n')
    assert {r.name for r in load_spec(path, out_root=tmp_path).runs} == {
        "tiny_rope_s42", "tiny_rope_max_steps-7_s42", "tiny_rope_max_steps-8_s42"}


# ------------------------------------------------------------------------------------------------------- submission


def test_submission_needs_sbatch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert sweep_main(SWEEPS / "smoke.toml", "--out-root", tmp_path / "runs") == 2
    assert "sbatch not found on PATH" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # starts the stand-ins for sbatch and squeue
def test_submission_writes_run_files_and_never_submits_a_queued_run_twice(tmp_path, capsys, monkeypatch):
    """Fake sbatch / squeue: sbatch records the script and prints a job id; squeue lists what was submitted."""
    bin_dir, log = tmp_path / "bin", tmp_path / "submitted.txt"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$2" >> {log}\nwc -l < {log} | tr -d " "\n')
    (bin_dir / "squeue").write_text(f'#!/bin/sh\n[ -f {log} ] && nl -w1 -s"|" {log}\nexit 0\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "runs"
    assert sweep_main(SWEEPS / "smoke.toml", "--out-root", root) == 0
    assert log.read_text().split() == [str(root / n / f"{n}.sbatch") for n in ("micro_rope_s0", "micro_alibi_s0")]
    for name, job in (("micro_rope_s0", "1"), ("micro_alibi_s0", "2")):
        assert (root / name / "slurm_jobs.txt").read_text().split()[0] == job
        assert json.loads((root / name / "config.json").read_text())["out_dir"] == str(root / name)
        assert json.loads((root / name / "sweep.json").read_text())["total_steps"] == 6
    capsys.readouterr()
    assert sweep_main(SWEEPS / "smoke.toml", "--out-root", root) == 0
    assert capsys.readouterr().out.count("is queued or running") == 2
    assert len(log.read_text().split()) == 2


FAKE_TORCHRUN = """#!{python}
# torchrun's stand-in: drops its options and runs train.py as one process. With FAKE_USR1_AT_STEP=k it sends the
# Slurm time-limit warning (SIGUSR1) once train.py logs step k, and exits 1 afterwards as torchrun does.
import os, signal, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("--"):
    args.pop(0)
at = os.environ.get("FAKE_USR1_AT_STEP")
proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
for line in proc.stdout:
    print(line, end="", flush=True)
    if at and line.startswith(f"step {{at}}/"):
        proc.send_signal(signal.SIGUSR1)
sys.exit(1 if at else proc.wait())
"""


def fake_slurm(bin_dir, log_dir):
    """sbatch that runs the batch script at once (as job 77 on 'localhost'), srun that drops its options, torchrun
    as above, scontrol that answers `show hostnames` and records requeues."""
    bin_dir.mkdir()
    scripts = {
        "sbatch": f'#!/bin/sh\nSLURM_JOB_ID=77 SLURM_NNODES=1 SLURM_JOB_NODELIST=localhost bash "$2" '
                  f'> {log_dir}/job.out 2>&1\necho "job exit $?" >> {log_dir}/job.out\necho 77\n',
        "squeue": "#!/bin/sh\nexit 0\n",
        "srun": '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
        "torchrun": FAKE_TORCHRUN.format(python=sys.executable),
        "scontrol": f'#!/bin/sh\n[ "$1" = show ] && echo localhost\n[ "$1" = requeue ] && echo "$2" >> '
                    f'{log_dir}/requeued\nexit 0\n',
        "python": f'#!/bin/sh\nexec {sys.executable} "$@"\n',  # the venv's interpreter
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


@pytest.mark.slow  # runs batch scripts: training and evaluation
def test_batch_script_checkpoints_requeues_resumes_then_evaluates(byte_shards, tmp_path, monkeypatch):
    """A submitted script run by stand-ins for SLURM on this machine. Job 77 gets the time-limit warning at step 2:
    train.py checkpoints, the script requeues the job and evaluates nothing. The requeued job resumes from that
    checkpoint, finishes and runs the chained evaluation; one more run trains and evaluates nothing."""
    fake_slurm(tmp_path / "bin", tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("FAKE_USR1_AT_STEP", "2")
    root, run = tmp_path / "runs", tmp_path / "runs" / "micro_rope_s0"
    common = [SWEEPS / "smoke.toml", "--out-root", root, "--set", f"data_dir={byte_shards}", "--only", "micro_rope*"]
    assert sweep_main(*common) == 0
    out = (tmp_path / "job.out").read_text()
    assert "stopped before the time limit; requeueing job 77" in out and "job exit 0" in out, out
    assert (tmp_path / "requeued").read_text().split() == ["77"]
    step, path = ckpt.list_checkpoints(run)[-1]
    assert step < 6 and ckpt.load_meta(path)["reason"] == "signal SIGUSR1"
    assert not (run / "eval").exists()

    def requeued_job(job_id):
        env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost")
        env.pop("FAKE_USR1_AT_STEP")
        done = subprocess.run(["bash", str(run / "micro_rope_s0.sbatch")], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    out = requeued_job("77")
    assert f"resumed from {path} at step {step}" in out and "step 6/6, last checkpoint: final" in out, out
    assert state.eval_done(run, "extrapolation", 6, ["1x", "2x"])
    out = requeued_job("78")
    assert "finished (6 of 6 steps); nothing to do" in out and "extrapolation done" in out, out
    assert len(list((run / "eval").glob("extrapolation_*.json"))) == 1
    assert (tmp_path / "requeued").read_text().split() == ["77"]
    assert sweep_main(*common) == 0  # done: not submitted again
    assert len((run / "slurm_jobs.txt").read_text().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- running locally


def snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.mark.slow  # a sweep end to end: trainings and evaluations
def test_local_sweep_trains_evaluates_skips_and_resumes(byte_shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny matmuls: threads only contend on a shared 2-core machine
    root = tmp_path / "runs"
    common = [SWEEPS / "smoke.toml", "--local", "--quiet", "--out-root", root, "--set", f"data_dir={byte_shards}"]
    assert sweep_main(*common) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "2 completed, 0 skipped (done), 0 failed" in out
    for name in ("micro_rope_s0", "micro_alibi_s0"):
        run = root / name
        assert ckpt.latest_checkpoint(run).name == "ckpt_0000006"
        assert state.eval_done(run, "extrapolation", 6, ["1x", "2x"])
        result = json.loads(next((run / "eval").glob("extrapolation_*.json")).read_text())
        assert result["data"] == str(next(byte_shards.glob("*_val_000000.bin")).resolve())  # the run's own data
        assert json.loads((run / "config.json").read_text())["pos_encoding"] == name.split("_")[1]

    before = snapshot(root)
    assert sweep_main(*common) == 0
    assert capsys.readouterr().out.count(": skipped (done)") == 2
    assert snapshot(root) == before  # nothing rewritten, not even sweep.json

    # A different config for the same run directory is refused before anything runs.
    assert sweep_main(*common, "--set", "learning_rate=0.01") == 2
    assert "learning_rate: 0.003 -> 0.01" in capsys.readouterr().err
    assert snapshot(root) == before

    # More steps: the finished run becomes unfinished and resumes from its step-6 checkpoint.
    assert sweep_main(*common, "--set", "max_steps=9", "--set", "lr_decay_steps=9", "--only", "micro_rope*") == 0
    run = root / "micro_rope_s0"
    assert "resumed from" in (run / "local.log").read_text() and "at step 6" in (run / "local.log").read_text()
    starts = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "start"]
    assert starts == [0, 6]
    assert state.eval_done(run, "extrapolation", 9, ["1x", "2x"])
    assert len(list((run / "eval").glob("extrapolation_*.json"))) == 2
    assert all(before[p] == (p.stat().st_mtime_ns, p.read_bytes()) for p in before if "alibi" in str(p))


def test_state_cli_tells_finished_time_limit_and_termination_apart(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "sweep.json").write_text(json.dumps(dict(name="r", total_steps=6, evals=[
        dict(name="extrapolation", args=[], lengths=["1x"])])))

    def checkpoint(step, reason, when):
        d = run / ckpt.checkpoint_name(step)
        d.mkdir()
        (d / "meta.json").write_text(json.dumps(dict(step=step, reason=reason, time=when)))

    now = time.time()
    assert state.main([str(run)]) == state.EXIT_OTHER  # nothing yet
    checkpoint(2, "signal SIGUSR1", now)
    assert state.main([str(run), "--since", str(now - 5)]) == state.EXIT_TIME_LIMIT
    assert state.main([str(run), "--since", str(now + 5)]) == state.EXIT_OTHER  # an older job's checkpoint
    checkpoint(4, "signal SIGTERM", now)
    assert state.main([str(run), "--since", str(now - 5)]) == state.EXIT_TERMINATED
    assert state.main([str(run), "--eval", "extrapolation"]) == 1
    checkpoint(6, "final", now)
    assert state.main([str(run), "--since", str(now - 5)]) == state.EXIT_FINISHED
    (run / "eval").mkdir()
    (run / "eval" / "extrapolation_1.json").write_text("")  # claimed by a killed evaluation: does not count
    assert state.main([str(run), "--eval", "extrapolation"]) == 1
    (run / "eval" / "extrapolation_2.json").write_text(json.dumps(dict(lengths=["1x"], checkpoints=[
        dict(path=str(run / "ckpt_0000006"), step=6)])))
    assert state.main([str(run), "--eval", "extrapolation"]) == 0
    assert state.main([str(run), "--eval", "zero_shot"]) == 2
    assert "chains no evaluation 'zero_shot'" in capsys.readouterr().err


def test_only_selects_runs_and_a_glob_matching_nothing_is_an_error(tmp_path):
    spec = load_spec(SWEEPS / "paper_tables.toml", out_root=tmp_path, only=["large_*kvshift*"])
    assert sorted(r.name for r in spec.runs) == sorted(f"large_{p}_kvshift_s42" for p in KV_SHIFT_ROWS)
    with pytest.raises(SpecError, match="--only 'small_\\*' matches no run"):
        load_spec(SWEEPS / "paper_tables.toml", out_root=tmp_path, only=["small_*"])


def test_set_reads_values_as_train_does_and_a_list_makes_an_axis(tmp_path):
    """--set values go through config.parse_value (1e1 is an int step count, as on train.py's command line); a TOML
    list replaces a setting by an axis, a quoted string is the string; unknown keys name the key and the flag."""
    spec = load_spec(SWEEPS / "smoke.toml", out_root=tmp_path,
                     settings=["max_steps=1e1", "seed=[1, 2]", 'data_dir="/scratch/shards"', "kv_shift=yes"])
    assert sorted(r.name for r in spec.runs) == sorted(f"micro_{pe}_kvshift_s{s}" for pe in ("rope", "alibi")
                                                       for s in (1, 2))
    assert {(r.cfg.max_steps, r.cfg.data_dir, r.cfg.model.kv_shift) for r in spec.runs} == \
           {(10, "/scratch/shards", True)}
    assert all(r.total_steps == 10 and r.cfg.data_seed == r.cfg.seed for r in spec.runs)
    with pytest.raises(SpecError, match="--set 'max_step=10': unknown key 'max_step'; did you mean 'max_steps'"):
        load_spec(SWEEPS / "smoke.toml", out_root=tmp_path, settings=["max_step=10"])
