"""errors.exit_status: an expected error is one line and exit 2; a bug keeps its traceback."""

import pytest

from errors import EXIT_USER_ERROR, UserError, exit_status


def test_user_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise UserError(f"config.toml: key 'block_size' must be > 0, got {argv[0]}")

    assert exit_status(main, ["0"]) == EXIT_USER_ERROR == 2
    assert capsys.readouterr().err == "error: config.toml: key 'block_size' must be > 0, got 0\n"


def test_a_bug_is_not_swallowed():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        exit_status(main)
    assert exit_status(lambda argv: 0) == 0
