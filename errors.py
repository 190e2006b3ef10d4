"""
One error path for every command (train, prep, evaluations, sweeps, reports, export):

    expected error (bad input, a damaged or busy directory, missing data)  ->  `error: <what>` on stderr, exit 2
    anything else (a bug)                                                  ->  Python's traceback, exit 1

An expected error is a `UserError` (each module's own error class derives from it, e.g. config.ConfigError,
checkpoint.CheckpointError). Its message names the file, key or value at fault and what was expected, so that it
needs no traceback. A command's `main` lets such errors propagate and is wrapped once by `exit_status`.
"""

import sys

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error the user can fix from its message alone (bad input, environment, a busy or damaged directory)."""


def exit_status(main, argv=None) -> int:
    """Run main(argv); a UserError becomes one `error: ...` line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
