"""The one base class of every user-facing error: `main` prints any of them as one line.

Each subclass's message names the key, file or value at fault and the fix; a traceback
would add nothing for the user, so `main` shows it only when asked (`--verbose`).
"""


class Phi4Error(Exception):
    """A mistake in the run's configuration, data or environment that the user can fix."""


class ConfigError(Phi4Error, ValueError):
    """A run configuration that cannot work; the message names the key and the fix."""


def require(ok: bool, key: str, value, fix: str) -> None:
    """Raises ConfigError `key=value: fix` unless `ok`: the one shape of every key's check."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {fix}")
