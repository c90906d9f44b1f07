"""The one exception type a user sees as a one-line message (set SLM_DEBUG=1 for the traceback)."""


class SlmError(Exception):
    """A failure caused by the user's input or environment, reported as one line on stderr, exit code 1.

    The message names the file, line or field at fault and what was expected.
    """
