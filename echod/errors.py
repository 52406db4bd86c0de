"""Fatal errors that end the command with one human sentence and an exit status.

Every layer raises these; only :mod:`echod.cli` turns them into a message on
stderr and an exit code, so no traceback ever reaches an operator.
"""

from __future__ import annotations


class EchodError(Exception):
    """A fatal error: ``str(err)`` is one sentence for a human."""

    exit_status = 1


class UsageError(EchodError):
    """A bad flag or value on the command line or in the settings."""

    exit_status = 2


class StartupError(EchodError):
    """A resource needed to start (a port, a socket path, a file) is unusable."""

    exit_status = 1


class UpgradeFailed(EchodError):
    """An upgrade did not happen; the running echod serves on. The message says why."""
