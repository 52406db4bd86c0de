"""The new echod's side of an upgrade: take every client over from the echod that started it.

An echod started with ``$ECHOD_HANDOVER_FD`` in its environment is a
successor (:mod:`echod.upgrade` describes the old side). In order:

1. Its arguments and config file were parsed by the CLI as for any start; a
   bad one ends it here with the usual one sentence on stderr, which is a
   pipe to the old echod until step 6: the old echod quotes it in
   ``ERR upgrade failed: ...``.
2. Logging as the arguments say; detached (no ``--foreground``), to the log
   file, and the working directory becomes ``/``. It does not fork or
   detach again, nor switch user: the old echod did that, and its successor
   inherits its session, umask, limits and identity.
3. ``hello``; then the state and the descriptors (:mod:`echod.handover`).
4. The :class:`~echod.service.Service` is built around them: the listening
   and control sockets are adopted, the registry goes on with the old
   counters and ids, every client is served with its unfinished line, its
   queued output and its clocks.
5. Serving starts; a detached successor writes its pid into the pidfile it
   was handed (its ``flock`` came with it); ``ready`` tells the old echod, which lets go and answers
   ``commit`` once it told systemd that this is the main pid now; then
   ``READY=1``.
6. stderr becomes the real one again.

The stdin console is never started: the terminal belongs to the shell once
the old echod exits. ``echod console`` works as before.

Error handling: anything that fails before step 5 ends the process with a
sentence on stderr (or a traceback, for a bug) and closes the channel; the
old echod then serves on. After step 5 the successor is the service.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace

from echod import handover, logs
from echod.config import Settings, default_log_file, default_pidfile
from echod.configfile import Source
from echod.handover import Channel, HandoverError
from echod.pidfile import Pidfile
from echod.service import Service
from echod.upgrade import Inherited, Launch

STATE_TIMEOUT = 60.0  # the old echod pauses its clients, then sends; bounded there too
COMMIT_TIMEOUT = 10.0


def is_successor() -> bool:
    return handover.CHANNEL_ENV in os.environ


def successor_main(settings: Settings, source: Source, launch: Launch) -> int:
    """Steps 2-6 of the module docstring; returns the exit status."""
    channel = Channel(socket.socket(fileno=int(os.environ.pop(handover.CHANNEL_ENV))))
    real_stderr = int(os.environ.pop(handover.STDERR_ENV))
    os.set_inheritable(real_stderr, False)
    settings = replace(settings, console=False)
    log_file: logs.LogFile | None = None
    if settings.foreground:
        logs.configure(settings.log_level, settings.log_format)
    else:
        log_file = logs.LogFile(settings.log_file or default_log_file())
        logs.configure(settings.log_level, settings.log_format, log_file)
        os.chdir("/")
    channel.send({"type": "hello", "version": handover.VERSION, "pid": os.getpid()})
    state, fds = handover.recv_state(channel, STATE_TIMEOUT)
    inherited = Inherited.take(state, fds)
    pidfile: Pidfile | None = None
    if inherited.pidfile_fd is not None:
        pidfile = Pidfile(settings.pidfile or default_pidfile())
        pidfile.fd = inherited.pidfile_fd
    service = Service(settings, log_file, source=source, launch=launch, inherited=inherited)
    service.pidfile_fd = pidfile.fd if pidfile is not None else None
    try:
        return service.run(on_ready=lambda: _ready(channel, real_stderr, pidfile))
    finally:
        if pidfile is not None:
            if service.successor_pid is None:
                pidfile.release()
            else:
                pidfile.forget()  # ours no more: the next echod writes its pid there


def _ready(channel: Channel, real_stderr: int, pidfile: Pidfile | None) -> None:
    """Name us in the pidfile; tell the old echod we serve; wait (bounded) until it
    let go; stderr back."""
    try:
        if pidfile is not None:
            pidfile.write_pid(os.getpid())
        channel.send({"type": "ready", "pid": os.getpid()})
        channel.recv(COMMIT_TIMEOUT, "commit")
    except HandoverError:
        pass  # the old echod is gone: we serve everyone anyway
    finally:
        os.dup2(real_stderr, 2)
        os.close(real_stderr)
        channel.close()
