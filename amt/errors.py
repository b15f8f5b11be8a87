"""The project's user-error base class: the CLI prints its message and exits 2, no traceback."""


class UserError(ValueError):
    """Bad input (a file, key or value that does not match what was expected)."""
