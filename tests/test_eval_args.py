"""Evaluation commands check every flag before any model is loaded or any file is written."""

import pytest

from eval import extrapolation, passkey


def _parse_error(main, argv, capsys):
    """main(argv) must stop at argument parsing: exit status 2 and argparse's one error line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("lengths, named", [("abc", "'abc' is not a length"), ("1x,2x,abc", "'abc' is not a length"),
                                            (",", "',' names no length"), ("0x", "'0x' is not a length"),
                                            ("-5", "'-5' is not a length"), ("infx", "'infx' is not a length")])
def test_bad_lengths_fail_before_any_work(tmp_path, capsys, lengths, named):
    """A missing checkpoint would be the first error of a command that got past parsing; nothing is written."""
    out = tmp_path / "out"
    argv = ["--checkpoint", str(tmp_path / "nockpt"), "--lengths", lengths, "--out", str(out)]
    for main in (extrapolation.main, passkey.main):
        line = _parse_error(main, argv, capsys)
        assert "argument --lengths" in line and named in line and "Nx" in line, line
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--stride", "abc"), ("--modes", "nonoverlap,windows"), ("--modes", ","),
                                         ("--tokens", "0"), ("--batch-size", "-1")])
def test_other_bad_extrapolation_flags_are_named(tmp_path, capsys, flag, value):
    line = _parse_error(extrapolation.main, ["--checkpoint", str(tmp_path / "nockpt"), flag, value], capsys)
    assert f"argument {flag}" in line and repr(value) in line, line


def test_good_lengths_parse_to_their_specs():
    args = extrapolation.parse_args(["--checkpoint", "c", "--lengths", " 1x, 0.5x ,300,"])
    assert args.lengths == ["1x", "0.5x", "300"] and args.modes == ["nonoverlap", "sliding"]
    assert extrapolation.parse_args(["--checkpoint", "c"]).lengths == ["1x", "2x", "4x", "8x", "16x"]


def test_passkey_depths_are_checked_at_parse_time(tmp_path, capsys):
    line = _parse_error(passkey.main, ["--checkpoint", str(tmp_path / "nockpt"), "--depths", "0,half"], capsys)
    assert "argument --depths" in line and "'0,half'" in line and "[0, 1]" in line, line


def test_an_evaluation_error_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    from eval.command import EvalError, command_main

    def run(args):
        raise args

    main = command_main(lambda argv: argv, run, str)
    assert main(EvalError("--label has 2 names for 1 checkpoints")) == 2
    assert capsys.readouterr().err == "error: --label has 2 names for 1 checkpoints\n"
    with pytest.raises(ValueError, match="a bug"):
        main(ValueError("a bug"))
