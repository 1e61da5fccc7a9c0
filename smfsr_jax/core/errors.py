"""Errors the project raises on purpose, and how the command-line entry points report them and their progress.

A `UserError` is something the user can fix (a bad checkpoint, input, config, missing weights or data): the
command prints its message and exits with status 2. A `RunFailure` is a run that could not go on (a
non-finite loss, a write that failed part-way): message and status 1. Neither prints a traceback unless
the command was given --debug; anything else is a bug and keeps its traceback.
"""

import contextlib
import logging
import sys
from typing import Callable


class UserError(Exception):
    """Bad input the user can fix; the message names the file or setting and the problem."""

    exit_code = 2


class RunFailure(Exception):
    """The run stopped part-way; the message says what was kept."""

    exit_code = 1


@contextlib.contextmanager
def as_user_error(what: str = ""):
    """Inside, the ValueError/OSError that libraries raise for a bad value or path given by the user
    become UserErrors (prefixed with `what`); the project's own errors pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, OSError) as e:
        raise UserError(f"{what}: {e}" if what else str(e)) from e


def run_cli(main: Callable[[], int | None], debug: bool = False) -> int:
    """`main()`'s exit status; the project's own errors become one line on stderr (re-raised with debug), and so
    does an interruption (Ctrl-C, a second SIGTERM during training: status 130, as a shell reports SIGINT)."""
    try:
        return main() or 0
    except (UserError, RunFailure) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        return 130


def show_log():
    """Print the package's progress lines (conversion, cache use, copies staged from buckets) on stderr, for
    command-line tools that configure no logging; a no-op where a handler is already installed (absl, pytest)."""
    log = logging.getLogger("smfsr_jax")
    log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
