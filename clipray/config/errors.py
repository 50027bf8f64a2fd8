"""The one error type a user sees as a single line (``clipray: error: ...``, exit status 2)."""


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line naming the file or field."""
