"""User-facing errors.

Library code raises :class:`LtdError` for anything a user can fix (bad path, bad size,
mismatched checkpoint); the CLI prints its one-line message and exits non-zero, never a
traceback. Internal bugs stay ordinary exceptions so that they are not hidden.
"""


class LtdError(Exception):
    """An error caused by user input; its message names the fix."""
