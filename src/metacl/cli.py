"""Turn user mistakes into one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys

from metacl.errors import MetaclError

EXIT_USER_ERROR = 2


def user_error(err: BaseException) -> MetaclError | None:
    """Our error, possibly wrapped by Hydra's instantiate (which re-raises with a cause)."""
    while err is not None:
        if isinstance(err, MetaclError):
            return err
        err = err.__cause__ or err.__context__
    return None


def run_with_clean_errors(fn, *args):
    # Raised inside the Hydra task function: Hydra would print a traceback and exit 1 for any
    # Exception, but lets SystemExit through, so the user sees only our one line.
    try:
        return fn(*args)
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise
        print(f"error: {found}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
