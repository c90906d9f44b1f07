"""The exceptions a user sees as a one-line message (set SLM_DEBUG=1 for the traceback), and their exit codes.

Exit codes, the same for every stage: 0 done; 1 an error (SlmError); 2 bad usage (typer's); 75 stopped by a signal
after saving a checkpoint (EX_TEMPFAIL from sysexits.h: "saved; run the same command again to resume").
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
