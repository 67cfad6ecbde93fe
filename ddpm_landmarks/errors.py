"""The errors the command line reports as one `error: ...` line instead of a traceback.

ConfigError and DataError are ValueErrors whose message names the key, file or line at fault
(exit status 2, before any training step when they come from the checks a run makes at start);
NonFiniteError stops a training that cannot step past non-finite losses (exit status 1).
"""


class ConfigError(ValueError):
    """A config file or override that does not match the schema (names the dotted key)."""


class DataError(ValueError):
    """Bad input data: the message names the file (and line) at fault."""


class NonFiniteError(RuntimeError):
    """Training produced non-finite losses / gradients / weights it cannot step past."""
