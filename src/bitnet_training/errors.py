"""The library's exception types.

Errors a user can cause (a bad config value, a missing file, an incompatible checkpoint) raise
`BitNetError` or a subclass, with a one-line message that names the problem. The CLI prints
that line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class BitNetError(ValueError):
    """A problem the user can fix: the message says what and where."""


class ConfigError(BitNetError):
    """An invalid configuration value; the message names the field, value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid: expected {allowed}")
