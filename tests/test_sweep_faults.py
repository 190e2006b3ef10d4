"""scripts/sweep.py on bad specs and damaged or hand-edited directories: every run and chained evaluation is
validated before anything is written or started, nothing differing is overwritten, and errors exit 2 with a line
that names the file."""

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


@pytest.mark.parametrize("setting, key", [("max_steps = 6", "max_steps"), ("val_tokens = 4096", "val_tokens")])
def test_a_run_config_that_fails_validation_stops_the_dry_run(tmp_path, capsys, setting, key):
    spec = smoke_spec(tmp_path, (setting, f"{key} = 0"))
    assert sweep_main(spec, "--dry-run", "--out", tmp_path / "scripts", "--out-root", tmp_path / "runs") == 2
    err = capsys.readouterr().err
    assert str(spec) in err and f"key {key!r} must be > 0" in err and "run 'micro_rope_s0'" in err, err
    assert not (tmp_path / "scripts").exists()
