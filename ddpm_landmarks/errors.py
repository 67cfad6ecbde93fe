"""The two errors every layer raises: a bad config value, bad input data.

Both are ValueErrors whose message names the key, file or line at fault; the command line prints
them as `error: ...` and exits with status 2, before any training step when they come from the
checks a run makes at start.
"""


class ConfigError(ValueError):
    """A config file or override that does not match the schema (names the dotted key)."""


class DataError(ValueError):
    """Bad input data: the message names the file (and line) at fault."""
