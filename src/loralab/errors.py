"""The one exception type that means 'the user's input is wrong' (exit code 2, one line)."""


class UserError(Exception):
    """Bad config, bad data, missing files: shown as one line, exit code 2, no traceback."""
