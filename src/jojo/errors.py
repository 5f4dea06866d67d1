"""User-facing errors.

A `JojoError` is a problem with the user's input (a missing file, a config typo, a checkpoint made with
another tokenizer). The CLI prints its message as one line on stderr and exits non-zero, with no
traceback. Messages name the problem and the fix.
"""


class JojoError(Exception):
    """An error caused by input the user can fix; printed as one line, exit status 2."""
