"""Errors that the command-line entry points report as one line instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class UserError(Exception):
    """A mistake in the user's input: a bad value, a missing file or a corrupt download.

    The message names the offending value and the fix. The entry points print it as
    one line and exit with status 2.
    """


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite, so the run cannot go on."""


@contextlib.contextmanager
def report_user_errors(reraise: bool = False) -> Iterator[None]:
    """Turn a UserError raised inside the block into one line on stderr and exit status 2.

    With reraise=True the error propagates instead, so that a Hydra sweeper records the job as a
    failed trial and goes on with the next one.
    """
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except MissingMandatoryValue as err:
        if reraise:
            raise
        key = getattr(err, "full_key", None) or "a required key"
        print(f"error: {key} has no value; pass {key}=VALUE on the command line", file=sys.stderr, flush=True)
        sys.exit(2)
    except UserError as err:
        if reraise:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
