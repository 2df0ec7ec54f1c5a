"""Errors that mean "the user asked for something impossible".

The CLI prints these as one line on stderr and exits non-zero; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in user input: bad config value, missing file, unknown name."""


class ConfigError(UserError, ValueError):
    """A model or training config that cannot work; the message says what to change."""


def check(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless cond holds: the one-line validation of config fields."""
    if not cond:
        raise ConfigError(msg)
