"""Detached mode (``echod`` without ``--foreground``): start, detach, say when serving.

Starting, in order (:func:`run_detached`)
-----------------------------------------
1. Resolve ``--user``/``--group`` (:mod:`echod.privileges`). Make sure
   descriptors 0-2 are open (so no socket we open can land on them and be
   clobbered by the redirection to /dev/null), note which descriptors we
   inherited, and set umask 027 for every file echod creates from here on.
2. Open the log file (``--log-file``) and send every log event to it as JSON
   lines. An unwritable log file fails here, on the terminal.
3. Lock the pidfile (``--pidfile``, :class:`~echod.pidfile.Pidfile`).
4. Build the :class:`~echod.service.Service`: it binds the listening socket
   and the control socket.
5. Drop privileges (:func:`~echod.privileges.drop_privileges`), giving the
   log file to the account.
6. Open the readiness pipe and fork. The original process waits on the pipe
   (step 10); the child goes on.
7. Open the :class:`daemon.DaemonContext` (fork, ``setsid``, fork again: the
   daemon is nobody's child and has no terminal; see :func:`_become_daemon`
   for each of its arguments).
8. Write the daemon's own pid into the pidfile (only now is it final) and
   send ``pid N`` through the pipe.
9. Serve (:meth:`Service.run`). Once accepting, send ``ok HOST PORT`` and
   close the pipe. After the stop: remove the pidfile and exit 0.
10. The original process prints ``echod listening on HOST:PORT (pid N)`` on
    stdout (with ``--port 0`` that is how the caller learns the port) and
    exits 0.

Error handling
--------------
- Steps 1-5 raise :class:`~echod.errors.EchodError` in the original process;
  what was acquired is released (the pidfile is removed: we held its lock)
  and the CLI prints the one sentence and exits non-zero.
- After the fork, a failure is logged (``startup_failed``), the pidfile is
  released, and the sentence goes through the pipe as ``err MESSAGE``; the
  original prints ``echod: MESSAGE`` and exits 1. If the pipe closes without
  a word (the daemon was killed), the original says the daemon died during
  start-up and names the log file. If no answer comes within
  :data:`READY_TIMEOUT`, the original stops the daemon and says so.
- A second stop signal during the graceful stop exits at once, status 1; the
  pidfile then stays, unlocked, which the next start and ``echod status``
  recognise as stale.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import daemon  # type: ignore[import-untyped]
import daemon.daemon  # type: ignore[import-untyped]

from echod import logs
from echod.config import Settings, default_log_file, default_pidfile
from echod.configfile import Source
from echod.errors import EchodError, StartupError
from echod.pidfile import Pidfile, is_alive, make_dir
from echod.privileges import drop_privileges, resolve_account
from echod.service import Service
from echod.upgrade import Launch

UMASK = 0o027
READY_TIMEOUT = 30.0  # how long the starting command waits for the daemon to serve


# -- the readiness pipe -----------------------------------------------------------


class Readiness:
    """The daemon's side of the readiness pipe: ``pid N``, then ``ok`` or ``err``."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, line: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, line.replace("\n", " ").encode("utf-8", "replace") + b"\n")
        except OSError:
            self.close()  # the starting command is gone (Ctrl-C): nobody to tell

    def ok(self, host: str, port: int) -> None:
        self.send(f"ok {host} {port}")
        self.close()

    def fail(self, message: str) -> None:
        self.send(f"err {message}")
        self.close()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


class DaemonDied(StartupError):
    """The readiness pipe ended without a word: the daemon was killed while starting."""


@dataclass(frozen=True)
class Started:
    pid: int
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def wait_ready(fd: int, timeout: float, log_path: Path) -> Started:
    """The original process: read the readiness pipe until ``ok``, ``err`` or its end.

    Raises :class:`StartupError` with the daemon's sentence, or one saying it
    died (end of pipe) or did not get ready in time (then it is stopped).
    """
    deadline = time.monotonic() + timeout
    buf = b""
    pid: int | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if pid is not None and is_alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)
                raise StartupError(
                    f"the daemon (pid {pid}) was not serving within "
                    f"{timeout:g} seconds and was stopped; see {log_path}"
                )
            raise StartupError(
                f"the daemon was not serving within {timeout:g} seconds; see {log_path}"
            )
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            who = f" (pid {pid})" if pid is not None else ""
            raise DaemonDied(f"the daemon{who} exited during start-up; see {log_path}")
        buf += chunk
        while b"\n" in buf:
            raw, _, buf = buf.partition(b"\n")
            word, _, rest = raw.decode("utf-8", "replace").partition(" ")
            if word == "pid":
                pid = int(rest)
            elif word == "err":
                raise StartupError(rest)
            elif word == "ok" and pid is not None:
                host, _, port = rest.rpartition(" ")
                return Started(pid, host, int(port))


# -- starting ---------------------------------------------------------------------


def _open_fds() -> set[int]:
    """The descriptors open now (the one listing /proc/self/fd itself excluded)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.add(fd)
    return fds


def _ensure_stdio() -> None:
    """Open /dev/null on any of fds 0-2 that is closed (``echod <&-``)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _signal_map() -> dict[int, object]:
    """python-daemon's defaults (ignore SIGTSTP/SIGTTIN/SIGTTOU) without its SIGTERM.

    Its SIGTERM handler raises ``SystemExit`` (exit status 1, a failure for
    any supervisor); :class:`Service` installs its own stop handlers.
    """
    signal_map: dict[int, object] = daemon.daemon.make_default_signal_map()
    signal_map.pop(signal.SIGTERM, None)
    return signal_map


def run_detached(
    settings: Settings, source: Source | None = None, launch: Launch | None = None
) -> int:
    """Start echod as a daemon; return 0 once it serves. See the module docstring.

    ``source``: where ``settings`` came from, for reloads; ``launch``: how
    echod was started, for upgrades.
    """
    account = resolve_account(settings.user, settings.group)
    _ensure_stdio()
    inherited = _open_fds()
    os.umask(UMASK)
    log_path = settings.log_file or default_log_file()
    make_dir(log_path.parent, "log file")
    log_file = logs.LogFile(log_path)
    logs.configure(settings.log_level, settings.log_format, log_file)
    log = logs.get_logger()
    pidfile = Pidfile(settings.pidfile or default_pidfile())
    service: Service | None = None
    try:
        pidfile.acquire()
        service = Service(settings, log_file=log_file, source=source, launch=launch)
        service.pidfile_fd = pidfile.fileno()  # an upgrade hands it (and its lock) over
        if account is not None:
            drop_privileges(account, chown=[log_path])
        if threading.active_count() != 1:  # fork copies only the calling thread
            raise StartupError("internal error: threads were started before detaching")
    except BaseException as err:
        log.error("startup_failed", detail=str(err) or type(err).__name__)
        if service is not None:
            service.close()
        pidfile.release()
        raise
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    # What the daemon keeps: all that steps 2-6 opened (listening and control
    # sockets, log file, pidfile, readiness pipe, the server's reserve
    # descriptor, the service's wake pipe), nothing it inherited.
    keep = (_open_fds() - inherited - {0, 1, 2, read_fd}) | {
        service.server.fileno(),
        log_file.fileno(),
        pidfile.fileno(),
        write_fd,
    }
    # Our own fork: python-daemon's first fork ends its parent at once with
    # os._exit, and the original process must stay to report on the pipe.
    child = os.fork()
    if child == 0:
        os.close(read_fd)
        _become_daemon(service, pidfile, log_file, Readiness(write_fd), keep)
    os.close(write_fd)
    try:
        started = wait_ready(read_fd, READY_TIMEOUT, log_path)
    except DaemonDied:
        pidfile.release()  # nobody is left to remove it
        raise
    finally:
        os.close(read_fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child, os.WNOHANG)
    print(f"echod listening on {started.address} (pid {started.pid})", flush=True)
    return 0


def _become_daemon(
    service: Service, pidfile: Pidfile, log_file: logs.LogFile, ready: Readiness, keep: set[int]
) -> NoReturn:
    """Steps 7-9 in the forked child; never returns into the caller's code.

    Each argument of the context answers a pitfall of python-daemon 3.1.2.
    Left out on purpose: ``pidfile`` (it expects the deprecated ``lockfile``
    package and has no stale-pidfile check: :class:`Pidfile` instead) and
    ``uid``/``gid`` (its switch keeps root's supplementary groups unless
    ``initgroups`` is set, and runs before anything else is done: privileges
    were dropped in step 5 instead).
    """
    log = logs.get_logger()
    status = 1
    failure: str | None = None
    try:
        with open(os.devnull, "r+b", buffering=0) as devnull:
            context = daemon.DaemonContext(
                working_directory="/",
                umask=UMASK,  # its default umask is 0
                # Auto-detected otherwise, and off when the parent is init or
                # stdin is a socket: we always detach.
                detach_process=True,
                prevent_core=True,
                # It closes every descriptor not listed (the log file's, the
                # wake pipe, the reserve descriptor too), and it extends the
                # list it is given in place: a fresh list.
                files_preserve=sorted(keep),
                # Left None, it opens /dev/null three times and never closes
                # those: one file we close ourselves.
                stdin=devnull,
                stdout=devnull,
                stderr=devnull,
                signal_map=_signal_map(),
            )
            context.open()  # returns in the grandchild only
        pidfile.write_pid(os.getpid())
        ready.send(f"pid {os.getpid()}")
        status = service.run(on_ready=lambda: ready.ok(service.server.host, service.server.port))
    except EchodError as err:
        failure = str(err)
        log.error("startup_failed", detail=failure)
    except BaseException as err:  # nothing may escape into the caller's code
        failure = f"unexpected error: {type(err).__name__}: {err}"
        log.error("daemon_crashed", error=type(err).__name__, detail=str(err), exc_info=True)
    finally:
        # Release before the original hears of a failure: a retry must find it free.
        removed = False
        if service.successor_pid is not None:
            pidfile.forget()  # the successor holds its lock and wrote its pid there
        else:
            removed = pidfile.release()
        if failure is not None:
            ready.fail(failure)
        log.info("exited", status=status, pidfile_removed=removed)
        with contextlib.suppress(Exception):
            log_file.flush()
        os._exit(status)
