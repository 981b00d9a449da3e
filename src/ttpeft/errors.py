"""The error type for user mistakes: the CLI prints its message on one line and exits non-zero."""


class InputError(ValueError):
    """A problem with what the user asked for (task, method, option, file), not a bug."""
