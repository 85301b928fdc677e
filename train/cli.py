"""What every command line of the app shares: user errors end in one line.

A mistake in what the user gave (a flag, a NIfTI file, a ``dataset.json``, a
run directory) ends the command with ONE line on stderr, ``error: ...``
naming the flag, file or directory, and a non-zero exit status, whichever
stage meets it first. Anything else is a bug and keeps its traceback.

- :func:`entry_point` decorates a command's ``main``; it maps the app's
  user-error types (:data:`USER_ERRORS`) to the line and the status.
- :class:`ArgumentParser` is argparse's parser with the same one-line errors
  (argparse prints its usage text first otherwise).
- :func:`parse_absl_flags` does the same for absl flags (``train.main``).
- :func:`int_list` parses a comma-separated list of ints for argparse.

Exit status: 2 for bad flags and settings (as argparse), 1 for bad data,
unusable run directories and runs that stop (non-finite loss).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from typing import Callable, NoReturn, Sequence

# Module -> the user-error classes it defines. Looked up by name among the
# modules already imported, so that catching them imports nothing (the
# --help of a command stays fast) and `train.data` need not know this module:
# an error of a module that was never imported cannot have been raised.
USER_ERRORS: dict[str, tuple[str, ...]] = {
    "train.config": ("ConfigError",),  # a flag or setting; .line() names the flag
    "train.data.nifti": ("DataError",),  # a file or dataset.json; the message starts with its path
    "train.predict": ("PredictError",),  # train.predict's inputs and run directory
    "train.checkpoint": ("CheckpointError",),  # a run directory without a usable checkpoint
    "train.trainer": ("NonFiniteLoss",),  # training diverged; the checkpoints before stay intact
}
USAGE_STATUS, ERROR_STATUS = 2, 1


def user_error_types() -> tuple[type[BaseException], ...]:
    """The classes of :data:`USER_ERRORS` whose modules are imported, plus OSError."""
    main = sys.modules.get("__main__")
    run_as = getattr(getattr(main, "__spec__", None), "name", None)  # `python -m train.predict` -> train.predict
    found = []
    for name, classes in USER_ERRORS.items():
        # A module run with -m is imported as __main__, a second copy with its own classes.
        for module in (sys.modules.get(name), main if run_as == name else None):
            found += [getattr(module, c) for c in classes if hasattr(module, c)]
    # A file or directory the user named that is missing, unwritable or in the way.
    return (*found, OSError)


def _first_line(text: str) -> str:
    lines = [x.strip() for x in str(text).strip().splitlines() if x.strip()]
    return lines[0] if lines else ""


def one_line(err: BaseException) -> str:
    """The ``error: ...`` line for a user error."""
    if hasattr(err, "line") and hasattr(err, "flag"):  # ConfigError names its flag
        return _first_line(err.line())
    if isinstance(err, OSError) and err.filename is not None:
        return f"error: {err.filename}: {err.strerror or _first_line(err)}"
    return f"error: {_first_line(err) or type(err).__name__}"


def status_of(err: BaseException) -> int:
    """2 for a bad flag or setting (as argparse), 1 for anything else the user gave."""
    config = sys.modules.get("train.config")
    return USAGE_STATUS if config is not None and isinstance(err, config.ConfigError) else ERROR_STATUS


def entry_point(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorates a command's ``main``: user errors print one line and return their exit status.

    The wrapped function returns ``main``'s status (None counts as 0), so
    ``sys.exit(main())`` and in-process callers both see it. Exceptions that
    are not user errors propagate unchanged.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except user_error_types() as err:  # evaluated when an exception arrives: sees what main imported
            if isinstance(err, OSError) and err.filename is None:
                raise  # no file to name: an OS failure of the code itself, keep its traceback
            sys.stdout.flush()
            print(one_line(err), file=sys.stderr, flush=True)
            return status_of(err)

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line ``error: ...`` (no usage text) and status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_STATUS, f"error: {_first_line(message)}\n")


def int_list(text: str) -> tuple[int, ...]:
    """argparse ``type=`` for comma-separated integers such as ``16,32,64``."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _absl_line(err) -> str:
    # absl says "flag --steps=abc: Expect argument to be a string or int" or
    # "Unknown command line flag 'foo'"; reduce both to "error: --flag: ...".
    text = _first_line(err)
    match = re.match(r"flag --(\w+)=.*?: (.*)", text)
    if match:
        return f"error: --{match.group(1)}: {match.group(2)}"
    match = re.search(r"flag '(\w+)'", text)
    if match:
        return f"error: --{match.group(1)}: unknown flag"
    return f"error: {text}"


HELP_FLAGS = ("help", "helpfull", "helpshort", "h", "?")


def parse_absl_flags(argv: Sequence[str]) -> list[str]:
    """``absl.app.run``'s ``flags_parser``: a bad flag exits with status 2 and one line naming it."""
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except flags.Error as err:
        print(_absl_line(err), file=sys.stderr)
        sys.exit(USAGE_STATUS)
    except SystemExit:
        # absl exits with status 1 after printing --help; asking for help is no failure.
        if any(a.lstrip("-").split("=")[0] in HELP_FLAGS for a in argv[1:]):
            sys.exit(0)
        raise
