"""Live reload: read the settings anew, apply what can change while serving, keep the rest.

Design
------
A reload (SIGHUP, ``echod ctl reload``, ``/reload``, ``systemctl reload``)
loads the :class:`~echod.configfile.Source` again (the config file, then the
same command-line flags as at start) and compares the result with the
running settings option by option. Nothing is declared here: each option's
``reloadable`` flag (:mod:`echod.config`) decides.

- A changed option declared ``reloadable`` takes its new value.
- A changed option that is not (host, port, backlog, user, group, pidfile,
  control socket, log file, ...) keeps its running value and is reported,
  ``needs restart: KEY``.

Who sees a new value: whoever reads :attr:`Reloader.current` when it needs
it (``Service.settings``, ``EchoServer.settings`` are that object, swapped
whole, so a reader never sees half of a reload). What else must happen is
an *applier* (:meth:`Reloader.add`), called at every reload with the old and
the new settings, changed or not (so one that reads files, such as TLS
certificates, reads them again):

1. *prepare*: the applier checks and builds what it needs, and may raise
   :class:`ReloadError`; then the reload stops and nothing has changed;
2. only when every applier has prepared do the new settings become current,
   and then each one's *commit* (the callable it returned) runs; a commit
   must not fail.

So a reload is all or nothing. Reloads are serialized by a lock (a SIGHUP
and an ``echod ctl reload`` may meet).

Error handling
--------------
:meth:`Reloader.reload` raises :class:`ReloadError` with one sentence (a
config file problem names the file and the key; several are joined by
``; ``), after logging it as ``config_reload_failed``; the running settings
are untouched. A reload that works is logged as ``config_reloaded`` with the
keys ``changed`` and those that ``needs_restart``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from echod.config import OPTIONS, Settings
from echod.configfile import Source
from echod.errors import EchodError, UsageError
from echod.logs import Logger, get_logger

Commit = Callable[[], None]
Applier = Callable[[Settings, Settings], Commit | None]
"""``prepare(old, new)``: raise :class:`ReloadError`, or return the commit (or None)."""


class ReloadError(EchodError):
    """The new settings cannot be applied; ``str(err)`` says why. Nothing changed."""


@dataclass(frozen=True)
class Outcome:
    """What a reload did: the options now changed, and those kept until a restart."""

    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]


class Reloader:
    """The running settings, and the way to replace them; see the module docstring."""

    def __init__(self, settings: Settings, source: Source | None, log: Logger | None = None):
        self.current = settings
        self.source = source
        self.log: Logger = log if log is not None else get_logger()
        self._appliers: list[Applier] = []
        self._lock = threading.Lock()

    def add(self, applier: Applier) -> None:
        """Call ``applier`` at every reload (in the order added)."""
        self._appliers.append(applier)

    def reload(self, trigger: str) -> Outcome:
        """Re-read and apply; ``trigger`` (``SIGHUP``, ``operator``) is logged."""
        with self._lock:
            try:
                outcome = self._reload()
            except ReloadError as err:
                self.log.error("config_reload_failed", trigger=trigger, detail=str(err))
                raise
        self.log.info(
            "config_reloaded",
            trigger=trigger,
            changed=list(outcome.changed),
            needs_restart=list(outcome.needs_restart),
        )
        return outcome

    def _reload(self) -> Outcome:
        if self.source is None or self.source.path is None:
            raise ReloadError("echod was started without --config: there is no file to re-read")
        old = self.current
        try:
            loaded = self.source.load()
        except UsageError as err:
            raise ReloadError(str(err)) from None
        changed: list[str] = []
        restart: list[str] = []
        for opt in OPTIONS:
            if getattr(loaded, opt.name) != getattr(old, opt.name):
                (changed if opt.reloadable else restart).append(opt.name)
        try:
            new = replace(loaded, **{name: getattr(old, name) for name in restart})
        except UsageError as err:  # a new value that only went with a restart-only one
            raise ReloadError(str(err)) from None
        commits = [commit for applier in self._appliers if (commit := applier(old, new))]
        self.current = new
        for commit in commits:
            commit()
        return Outcome(tuple(changed), tuple(restart))
