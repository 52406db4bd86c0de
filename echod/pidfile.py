"""The pidfile, and ``echod status`` / ``echod stop``, which read it.

The pidfile is locked with ``flock(2)``, not ``lockf``/``fcntl`` record
locks: those belong to a process and are not inherited by ``fork``, so the
forks of detaching (:mod:`echod.daemonize`) would drop them; an ``flock``
lock belongs to the open file description that the forks share, so it is
held without a gap from :meth:`Pidfile.acquire` until the daemon exits, and
the kernel releases it whatever way the daemon dies. Hence a stale pidfile
never blocks a start, and nobody is signalled on the word of a pidfile that
is not locked. The daemon removes the pidfile at exit; a daemon that dropped
privileges may not be allowed to (a root-owned directory), and then empties
it instead: an empty, unlocked pidfile means "not running".

:func:`read_state` tells what a pidfile says without disturbing its owner,
as one of the LSB status codes of :data:`STATUS_CODES` (``echod status``
exits with it). ``echod stop`` sends SIGTERM to the pid of a *locked*
pidfile that this pid really holds open, waits until the process is gone
(``--timeout``), and exits 0; stopping an echod that is not running is also
a success (LSB), and removes a stale pidfile. It exits 1 if the daemon does
not stop in time and 4 when it may not signal it.

Error handling: :class:`Pidfile` raises
:class:`~echod.errors.StartupError` with one sentence; :func:`read_state`
never raises for what it finds, it reports it as a state.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from echod.config import Parser, default_pidfile, parse_duration, parse_path
from echod.errors import StartupError

PIDFILE_MODE = 0o644
DIR_MODE = 0o755  # directories echod creates for its pidfile and log file
STOP_TIMEOUT = 15.0  # echod stop: default wait for the daemon to be gone
LOCK_RETRY_SECONDS = 0.3  # a status probe holds a shared lock for an instant
PID_GRACE_SECONDS = 1.0  # a starting daemon holds the lock before its pid is written
POLL_SECONDS = 0.05

RUNNING, DEAD, NOT_RUNNING, UNKNOWN = 0, 1, 3, 4
# echod status exit codes (LSB), stated here once; echod status --help prints them.
STATUS_CODES = {
    RUNNING: "running",
    DEAD: "not running, but the pidfile remains (stale)",
    NOT_RUNNING: "not running",
    UNKNOWN: "unknown (the pidfile cannot be read, or its lock holder is not the pid it names)",
}


def _try_lock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    """The pid in the file, or None if it is empty or holds something else."""
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _is_same_file(fd: int, path: Path) -> bool:
    """Is ``path`` still the file open on ``fd`` (not removed or replaced)?"""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def make_dir(directory: Path, what: str) -> None:
    """Create ``directory`` (mode 0755, whatever the umask) if it is missing."""
    if directory.is_dir():
        return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(directory, DIR_MODE)
        os.chmod(directory, DIR_MODE)
    except FileExistsError:
        if not directory.is_dir():
            raise StartupError(
                f"cannot use {what} directory {directory}: it exists and is not a directory"
            ) from None
    except OSError as err:
        raise StartupError(
            f"cannot create {what} directory {directory}: {err.strerror or err}"
        ) from None


class Pidfile:
    """A pidfile that is ``flock``-ed for as long as its daemon runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        """Create or open the pidfile and lock it, emptied; raise :class:`StartupError`.

        The lock holder's pid is reported as "already running (pid N)". A file
        removed or replaced between our open and our lock (its daemon was
        exiting) is opened again, so two starters never lock different files.
        """
        make_dir(self.path.parent, "pidfile")
        deadline = time.monotonic() + LOCK_RETRY_SECONDS
        while True:
            fd = self._open()
            if _try_lock(fd, fcntl.LOCK_EX):
                if _is_same_file(fd, self.path):
                    break
                os.close(fd)
                continue
            pid = _read_pid(fd)
            os.close(fd)
            if time.monotonic() >= deadline:
                who = f"pid {pid}" if pid else f"pidfile {self.path} is locked"
                raise StartupError(f"already running ({who})")
            time.sleep(POLL_SECONDS)
        try:
            os.ftruncate(fd, 0)
            with contextlib.suppress(PermissionError):  # not ours: keep its mode
                os.fchmod(fd, PIDFILE_MODE)
        except OSError as err:
            os.close(fd)
            raise StartupError(f"cannot write pidfile {self.path}: {err.strerror}") from None
        self.fd = fd

    def _open(self) -> int:
        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, PIDFILE_MODE
            )
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise StartupError(
                    f"pidfile {self.path} is a symbolic link; refusing to use it"
                ) from None
            raise StartupError(f"cannot open pidfile {self.path}: {err.strerror or err}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StartupError(f"pidfile {self.path} is not a regular file")
        return fd

    def fileno(self) -> int:
        if self.fd is None:
            raise ValueError("pidfile not acquired")
        return self.fd

    def write_pid(self, pid: int) -> None:
        fd = self.fileno()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{pid}\n".encode("ascii"), 0)
        except OSError as err:
            raise StartupError(f"cannot write pidfile {self.path}: {err.strerror}") from None

    def forget(self) -> None:
        """Close without removing: an upgrade's successor holds the lock and names itself."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def release(self) -> bool:
        """Remove the pidfile (or empty it if we may not remove it) and unlock it.

        Returns whether the file was removed. Never removes a file that is
        not the one we locked. Safe to call more than once.
        """
        fd, self.fd = self.fd, None
        if fd is None:
            return False
        removed = False
        try:
            if _is_same_file(fd, self.path):
                os.unlink(self.path)
                removed = True
        except OSError:
            with contextlib.suppress(OSError):  # an unlocked, empty pidfile: not running
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        return removed


@dataclass(frozen=True)
class PidfileState:
    """What a pidfile says: an LSB status code, the pid, and one sentence."""

    status: int
    pid: int | None
    message: str
    permission_denied: bool = False


def _holds_open(pid: int, st: os.stat_result) -> bool | None:
    """Does process ``pid`` have the file ``st`` open? None: not allowed to look."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return False
    except PermissionError:
        return None
    for name in names:
        try:
            other = os.stat(f"{fd_dir}/{name}")
        except OSError:
            continue
        if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def is_alive(pid: int) -> bool:
    """Does ``pid`` exist and is it not a zombie (no init reaps it in some containers)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    fields = data.rpartition(b")")[2].split()
    return bool(fields) and fields[0] not in (b"Z", b"X")


def read_state(path: Path, grace: float = PID_GRACE_SECONDS) -> PidfileState:
    """Read ``path`` without disturbing its owner: who, if anyone, runs behind it.

    A lock taken by a daemon that has not yet written its pid is waited for
    up to ``grace`` seconds.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return PidfileState(NOT_RUNNING, None, f"echod is not running (no pidfile {path})")
    except OSError as err:
        return PidfileState(
            UNKNOWN,
            None,
            f"cannot read pidfile {path}: {err.strerror or err}",
            permission_denied=err.errno in (errno.EACCES, errno.EPERM),
        )
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return PidfileState(UNKNOWN, None, f"pidfile {path} is not a regular file")
        if _try_lock(fd, fcntl.LOCK_SH):  # nobody holds it: no daemon behind it
            fcntl.flock(fd, fcntl.LOCK_UN)
            pid = _read_pid(fd)
            if pid is None and not os.pread(fd, 1, 0):
                return PidfileState(NOT_RUNNING, None, "echod is not running")
            stale = f"pid {pid}" if pid else "no valid pid"
            return PidfileState(
                DEAD, pid, f"echod is not running, but its pidfile {path} remains ({stale}; stale)"
            )
        deadline = time.monotonic() + grace
        while (pid := _read_pid(fd)) is None and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
    finally:
        os.close(fd)
    if pid is None:
        return PidfileState(UNKNOWN, None, f"pidfile {path} is locked but holds no pid")
    holds = _holds_open(pid, st)
    if holds is False:
        return PidfileState(
            UNKNOWN,
            pid,
            f"pidfile {path} is locked, but pid {pid} does not hold it; not touching that process",
        )
    return PidfileState(RUNNING, pid, f"echod is running (pid {pid})")


# -- echod status / echod stop -----------------------------------------------------


def _parser(prog: str, description: str) -> Parser:
    parser = Parser(prog=prog, description=description)
    parser.add_argument(
        "--pidfile",
        type=parse_path,
        default=None,
        metavar="PATH",
        help=f"the daemon's pidfile (default: {default_pidfile()})",
    )
    return parser


def status_main(argv: Sequence[str]) -> int:
    """``echod status``: exit with the :data:`STATUS_CODES` code of the pidfile's state."""
    codes = "; ".join(f"{code} {meaning}" for code, meaning in STATUS_CODES.items())
    parser = _parser("echod status", f"Is a detached echod running? (LSB exit codes: {codes})")
    args = parser.parse_args(argv)
    state = read_state(args.pidfile or default_pidfile())
    if state.status == UNKNOWN:
        print(f"echod: {state.message}", file=sys.stderr)
    else:
        print(state.message)
    return state.status


def _remove_stale(path: Path) -> None:
    """Remove a pidfile nobody holds (taking its lock first, so never a live one)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            if _try_lock(fd, fcntl.LOCK_EX) and _is_same_file(fd, path):
                os.unlink(path)
        finally:
            os.close(fd)


def stop_main(argv: Sequence[str]) -> int:
    """``echod stop``: SIGTERM the daemon of a locked pidfile and wait until it is gone."""
    parser = _parser(
        "echod stop",
        "Stop a detached echod and wait until it has exited. "
        "Stopping an echod that is not running succeeds.",
    )
    parser.add_argument(
        "--timeout",
        type=parse_duration,
        default=STOP_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for it to exit (default: {STOP_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    path: Path = args.pidfile or default_pidfile()
    state = read_state(path)
    if state.status in (NOT_RUNNING, DEAD):
        if state.status == DEAD:
            _remove_stale(path)
        print(state.message)
        return 0
    if state.status == UNKNOWN or state.pid is None:
        print(f"echod: {state.message}", file=sys.stderr)
        return 4 if state.permission_denied else 1
    pid = state.pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it just exited
    except PermissionError:
        print(f"echod: not permitted to stop echod (pid {pid})", file=sys.stderr)
        return 4
    deadline = time.monotonic() + args.timeout
    while is_alive(pid):
        if time.monotonic() >= deadline:
            print(
                f"echod: echod (pid {pid}) did not stop within {args.timeout:g} seconds",
                file=sys.stderr,
            )
            return 1
        time.sleep(POLL_SECONDS)
    print(f"echod stopped (pid {pid})")
    return 0
