"""The exceptions a user sees as a one-line message (set SLM_DEBUG=1 for the traceback), and their exit codes.

Exit codes, the same for every stage: 0 done; 1 an error (SlmError); 2 bad usage (UsageError: an option missing or
out of range, an unknown option, a missing argument); 75 stopped by a signal after saving a checkpoint (EX_TEMPFAIL
from sysexits.h: "saved; run the same command again to resume"); 141 standard output closed early (a pipe's reader
left, as `head` does: what a process killed by SIGPIPE reports).
"""

EX_TEMPFAIL = 75


class SlmError(Exception):
    """A failure caused by the user's input or environment, reported as one line on stderr, exit code 1.

    The message names the file, line or field at fault and what was expected. It is kept to one line: line breaks
    that reach it from the user's data (a JSON key, a YAML value) are shown escaped.
    """

    exit_code = 1

    def __init__(self, message="", *args):
        if isinstance(message, str):
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(message, *args)


class Stopped(SlmError):
    """A run was asked to stop (SIGTERM / SIGUSR1), saved a checkpoint and exits with 75: run it again to resume."""

    exit_code = EX_TEMPFAIL


class Interrupted(SlmError):
    """A second signal of the same kind stopped a run at once, without saving: exit code 128 + the signal's number,
    as a shell reports a process that a signal ended (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class UsageError(SlmError):
    """The command line asks for something impossible (an option missing, or out of its range): exit code 2."""

    exit_code = 2


# -- the ranges of numeric options: each config checks its fields in __post_init__ with `check_ranges` -----------
POSITIVE = "a positive {what}"
AT_LEAST_0 = "{what} >= 0"
AT_LEAST_1 = "{what} >= 1"
FRACTION = "{what} from 0 to 1"
MASS = "{what} above 0, at most 1"
_TESTS = {POSITIVE: lambda v: v > 0, AT_LEAST_0: lambda v: v >= 0, AT_LEAST_1: lambda v: v >= 1,
          FRACTION: lambda v: 0 <= v <= 1, MASS: lambda v: 0 < v <= 1}


def check_ranges(cfg, options: dict[str, str] | None = None, **ranges: str) -> None:
    """A UsageError naming the option and its value unless each field of CFG (an object or a dict) named in RANGES
    (field=POSITIVE, AT_LEAST_0, AT_LEAST_1, FRACTION or MASS) is a finite number in its range; None is unset and
    passes. The option is --FIELD (underscores as dashes) unless OPTIONS names another."""
    import math

    for name, kind in ranges.items():
        value = cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                             and _TESTS[kind](value)):
            continue
        option = (options or {}).get(name, "--" + name.replace("_", "-"))
        what = "integer" if isinstance(value, int) else "number"
        expected = kind.format(what=what)
        if not expected.startswith("a "):
            expected = ("an " if what == "integer" else "a ") + expected
        raise UsageError(f"{option} {value}: expected {expected}")
