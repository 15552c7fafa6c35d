"""One exception type for bad input.

Anything the user controls (a config, a data file, a checkpoint, a CLI argument) that is wrong raises
`UserError` with a one-line message naming the problem and the fix. The CLI prints it and exits with
code 2, no traceback; library callers can catch it like any exception.
"""


class UserError(Exception):
    """Bad input from the user: the message is one line that says what is wrong and how to fix it."""
