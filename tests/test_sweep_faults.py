"""scripts/sweep.py on bad specs and damaged or hand-edited directories: every run and chained evaluation is
validated before anything is written or started, nothing differing is overwritten, and errors exit 2 with a line
that names the file."""

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = (REPO / "configs" / "sweeps" / "smoke.toml").read_text()


def sweep_main(*argv):
    from scripts import sweep

    return sweep.main([str(a) for a in argv])


def smoke_spec(tmp_path, *replacements):
    """configs/sweeps/smoke.toml with (old, new) text replacements, its [sizes] path made absolute."""
    text = SMOKE.replace('"../tiny/base.toml"', f'"{REPO / "configs" / "tiny" / "base.toml"}"')
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("mode", [["--dry-run", "--out", "scripts"], ["--local"], ["--list"]])
@pytest.mark.parametrize("replacement, needles", [
    (('lengths = "1x,2x"', 'lengths = "1x,abc"'), ["[eval.extrapolation]", "argument --lengths", "'abc'"]),
    (('lengths = "1x,2x"', 'lengths = ","'), ["[eval.extrapolation]", "argument --lengths", "names no length"]),
    (('"--modes", "nonoverlap"', '"--modez", "nonoverlap"'), ["[eval.extrapolation]", "--modez"]),
    (('"--tokens", "4096"', '"--tokens", "many"'), ["[eval.extrapolation]", "argument --tokens", "'many'"]),
])
def test_bad_chained_evaluation_arguments_fail_before_anything_runs(tmp_path, capsys, mode, replacement, needles):
    spec = smoke_spec(tmp_path, replacement)
    root = tmp_path / "runs"
    argv = [tmp_path / a if a == "scripts" else a for a in mode]
    assert sweep_main(spec, "--out-root", root, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(spec) in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not root.exists() and not (tmp_path / "scripts").exists()


@pytest.mark.parametrize("setting, key", [("max_steps = 6", "max_steps"), ("val_tokens = 4096", "val_tokens"),
                                          ("block_size = 64", "block_size")])
def test_a_run_config_that_fails_validation_stops_the_dry_run(tmp_path, capsys, setting, key):
    spec = smoke_spec(tmp_path, (setting, f"{key} = 0"))
    assert sweep_main(spec, "--dry-run", "--out", tmp_path / "scripts", "--out-root", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    named = f"key {key!r} must be > 0" in err or f"GPTConfig.{key} must be a positive int, got 0" in err
    assert str(spec) in err and named and "run 'micro_rope_s0'" in err, err
    assert not (tmp_path / "scripts").exists()


# ---------------------------------------------------------------------------------------------- files that differ


def test_dry_run_never_replaces_a_differing_script_unless_forced(tmp_path, capsys):
    spec, out, root = smoke_spec(tmp_path), tmp_path / "scripts", tmp_path / "runs"
    argv = [spec, "--dry-run", "--out", out, "--out-root", root]
    assert sweep_main(*argv) == 0
    edited, other = out / "micro_rope_s0.sbatch", out / "micro_alibi_s0.sbatch"
    written = edited.read_text()
    before = other.stat().st_mtime_ns
    assert sweep_main(*argv) == 0  # identical files are fine
    edited.write_text(written.replace("#SBATCH --requeue", "#SBATCH --requeue\n#SBATCH --mail-type=END"))
    capsys.readouterr()
    assert sweep_main(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(edited) in err and "--force" in err, err
    assert "--mail-type=END" in edited.read_text() and other.stat().st_mtime_ns == before
    assert sweep_main(*argv, "--force") == 0
    assert edited.read_text() == written and os.access(edited, os.X_OK)


def fake_submission(monkeypatch):
    """sbatch and squeue replaced in-process: [the scripts submitted]."""
    from sweeps import slurm

    submitted = []
    monkeypatch.setattr(slurm, "check_available", lambda: None)
    monkeypatch.setattr(slurm, "queued_scripts", lambda: {})
    monkeypatch.setattr(slurm, "submit", lambda script: submitted.append(script) or str(len(submitted)))
    return submitted


def test_submission_never_replaces_a_hand_edited_script_in_a_run_directory(tmp_path, capsys, monkeypatch):
    submitted = fake_submission(monkeypatch)
    spec, root = smoke_spec(tmp_path), tmp_path / "runs"
    script = root / "micro_alibi_s0" / "micro_alibi_s0.sbatch"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/bash\n# my own\n")
    assert sweep_main(spec, "--out-root", root) == 2
    err = capsys.readouterr().err
    assert str(script) in err and "differs" in err and "--force" in err, err
    assert submitted == [] and script.read_text() == "#!/bin/bash\n# my own\n"
    assert not (root / "micro_rope_s0").exists()  # checked before any run's files are written
    assert sweep_main(spec, "--out-root", root, "--force") == 0
    assert [p.name for p in submitted] == ["micro_rope_s0.sbatch", "micro_alibi_s0.sbatch"]
    assert script.read_text().startswith("#!/bin/bash\n# micro_alibi_s0: written by scripts/sweep.py")
    for run in ("micro_rope_s0", "micro_alibi_s0"):
        assert json.loads((root / run / "sweep.json").read_text())["name"] == run
        assert (root / run / ".lock").read_text() == ""  # released before launching: train.py locks it next
        assert [p.name for p in (root / run).iterdir() if ".tmp-" in p.name] == []


# ------------------------------------------------------------------------------------ damaged or busy directories


def test_list_names_a_checkpoint_without_meta_json_and_dry_run_refuses_an_out_file(tmp_path, capsys):
    spec, root = smoke_spec(tmp_path), tmp_path / "runs"
    (root / "micro_rope_s0" / "ckpt_0000003").mkdir(parents=True)
    assert sweep_main(spec, "--list", "--out-root", root) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "micro_rope_s0" in x)
    assert "new; ckpt_0000003 unreadable" in line and "meta.json not found" in line, line
    out_file = tmp_path / "scripts.txt"
    out_file.write_text("not a directory")
    assert sweep_main(spec, "--dry-run", "--out", out_file, "--out-root", root) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and str(out_file) in err and "is a file" in err, err
    assert out_file.read_text() == "not a directory"


def test_a_corrupt_config_json_is_a_conflict_that_names_the_file(tmp_path, capsys):
    spec, root = smoke_spec(tmp_path), tmp_path / "runs"
    (root / "micro_rope_s0").mkdir(parents=True)
    (root / "micro_rope_s0" / "config.json").write_text('{"n_layer": 2,')
    assert sweep_main(spec, "--list", "--out-root", root) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "micro_rope_s0" in x)
    assert "conflict" in line and str(root / "micro_rope_s0" / "config.json") in line and "not valid JSON" in line


@pytest.mark.parametrize("text", ['{"name": "r", "total', "[]"])
def test_state_cli_names_an_unreadable_sweep_json(tmp_path, capsys, text):
    from sweeps import state

    (tmp_path / "sweep.json").write_text(text)
    assert state.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "sweep.json") in err, err


def test_run_files_are_not_written_while_another_process_holds_the_run_directory(tmp_path, capsys, monkeypatch):
    from lockfile import DirectoryLock

    submitted = fake_submission(monkeypatch)
    spec, root = smoke_spec(tmp_path), tmp_path / "runs"
    with DirectoryLock(root / "micro_rope_s0", "training"):
        assert sweep_main(spec, "--out-root", root) == 2
    err = capsys.readouterr().err
    assert "is in use: training by pid" in err and str(root / "micro_rope_s0" / ".lock") in err, err
    assert submitted == [] and not (root / "micro_rope_s0" / "sweep.json").exists()
