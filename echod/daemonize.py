"""Detached mode (``echod`` without ``--foreground``), ``echod stop`` and ``echod status``.

Starting, in order (:func:`run_detached`)
-----------------------------------------
1. Check what the flags alone decide: ``--console`` needs a terminal;
   ``--user``/``--group`` need root and existing accounts. Make sure
   descriptors 0-2 are open (so no socket we open can land on them and be
   clobbered by the redirection to /dev/null), note which descriptors we
   inherited, and set umask 027 for every file echod creates from here on.
2. Open the log file (``--log-file``) and send every log event to it as JSON
   lines. An unwritable log file fails here, on the terminal.
3. Lock the pidfile (``--pidfile``) with ``flock``. A lock held by someone
   else means "already running (pid N)"; an unlocked pidfile is stale (its
   daemon was killed) and is taken over.
4. Build the :class:`~echod.service.Service`: it binds the listening socket
   and the control socket.
5. ``--user``/``--group`` (as root): hand the log file to that user (SIGHUP
   must be able to reopen it), then set the supplementary groups, the gid and
   the uid, real, effective and saved, for good.
6. Open the readiness pipe and fork. The original process waits on the pipe
   (step 11); the child goes on. This extra fork is needed because
   python-daemon's own first fork ends its parent at once with ``os._exit``.
7. Open the :class:`daemon.DaemonContext`: fork, ``setsid``, fork again (the
   daemon is nobody's child and has no terminal), umask 027, working
   directory ``/``, stdin/stdout/stderr on /dev/null, every descriptor closed
   except the preserved ones: all that steps 2-6 opened (listening and
   control sockets, log file, pidfile, readiness pipe, the server's reserve
   descriptor, the service's wake pipe).
8. Write the daemon's own pid into the pidfile (only now is it final) and
   send ``pid N`` through the pipe.
9. Serve (:meth:`Service.run`). Once accepting, send ``ok HOST PORT`` and
   close the pipe.
10. On SIGTERM or SIGINT: the graceful stop; remove the pidfile; exit 0.
11. The original process prints ``echod listening on HOST:PORT (pid N)`` on
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

The pidfile
-----------
Locked with ``flock(2)``, not ``lockf``/``fcntl`` record locks: those belong
to a process and are not inherited by ``fork``, so the forks of steps 6-7
would drop them; an ``flock`` lock belongs to the open file description that
the forks share, so it is held without a gap from step 3 until the daemon
exits, and the kernel releases it whatever way the daemon dies. Hence a
stale pidfile never blocks a start, and nobody is signalled on the word of a
pidfile that is not locked. The daemon removes the pidfile at exit; a
daemon that dropped privileges may not be allowed to (a root-owned
directory), and then empties it instead: an empty, unlocked pidfile means
"not running".

``echod status`` (LSB exit codes): 0 running, 1 not running but the pidfile
remains (stale), 3 not running, 4 unknown (the pidfile cannot be read, or its
lock holder is not the pid it names). ``echod stop`` sends SIGTERM to the pid
in a *locked* pidfile that this pid really holds open, waits until the
process is gone (``--timeout``), and exits 0; stopping an echod that is not
running is also a success (exit 0, LSB), and removes a stale pidfile. It
exits 1 if the daemon does not stop in time and 4 when it may not signal it.

python-daemon 3.1.2 pitfalls handled here
-----------------------------------------
- Its default ``umask`` is 0; ``detach_process`` is auto-detected and is
  *off* when the parent is init or stdin is a socket: both are set explicitly.
- Its default SIGTERM handler raises ``SystemExit`` (exit status 1, a failure
  for any supervisor): it is left out of ``signal_map``; Service installs its
  own handlers.
- It closes every descriptor not in ``files_preserve``, the log file's, the
  service's wake pipe and the server's reserve descriptor included; and it
  extends the list it is given in place.
- With ``stdin``/``stdout``/``stderr`` left ``None`` it opens /dev/null three
  times and never closes those descriptors: one /dev/null file is passed
  instead and closed afterwards.
- Its ``uid``/``gid`` switch keeps root's supplementary groups unless
  ``initgroups`` is set, and it runs before anything else: privileges are
  dropped here instead (step 5).
- Its ``pidfile`` option expects the deprecated ``lockfile`` package, with no
  stale-pidfile check: :class:`Pidfile` replaces it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import grp
import os
import pwd
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import daemon  # type: ignore[import-untyped]
import daemon.daemon  # type: ignore[import-untyped]

from echod import logs
from echod.config import Settings, default_log_file, default_pidfile
from echod.errors import EchodError, StartupError, UsageError
from echod.service import Service

UMASK = 0o027
PIDFILE_MODE = 0o644
DIR_MODE = 0o755  # directories echod creates for its pidfile and log file
READY_TIMEOUT = 30.0  # how long the starting command waits for the daemon to serve
STOP_TIMEOUT = 15.0  # echod stop: default wait for the daemon to be gone
LOCK_RETRY_SECONDS = 0.3  # a status probe holds a shared lock for an instant
PID_GRACE_SECONDS = 1.0  # a starting daemon holds the lock before its pid is written
POLL_SECONDS = 0.05

# echod status exit codes (LSB)
RUNNING, DEAD, NOT_RUNNING, UNKNOWN = 0, 1, 3, 4


# -- the pidfile --------------------------------------------------------------


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


def _make_dir(directory: Path, what: str) -> None:
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
        _make_dir(self.path.parent, "pidfile")
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


def inspect(path: Path, grace: float = PID_GRACE_SECONDS) -> PidfileState:
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


# -- privileges -----------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """Who to become after binding: ``uid`` None keeps the user (``--group`` only)."""

    user: str | None
    uid: int | None
    gid: int


def resolve_account(user: str | None, group: str | None) -> Account | None:
    """Look up ``--user``/``--group`` before anything is bound; None if neither is given."""
    if user is None and group is None:
        return None
    if os.geteuid() != 0:
        raise UsageError(
            "--user and --group need echod to be started as root "
            "(it binds, then switches to that user)"
        )
    name: str | None = None
    uid: int | None = None
    gid: int | None = None
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--user: no such user {user!r}") from None
        name, uid, gid = pw.pw_name, pw.pw_uid, pw.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except KeyError:
            raise UsageError(f"--group: no such group {group!r}") from None
    assert gid is not None
    return Account(name, uid, gid)


def drop_privileges(account: Account, chown: Iterable[Path] = ()) -> None:
    """Give ``chown`` files to the account, then become it for good.

    The uid is set last (after it, nothing else may change), real, effective
    and saved alike, and regaining root is checked to fail.
    """
    who = account.user or f"group {account.gid}"
    for path in chown:
        try:
            os.chown(path, -1 if account.uid is None else account.uid, account.gid)
        except OSError as err:
            raise StartupError(f"cannot give {path} to {who}: {err.strerror}") from None
    try:
        if account.user is not None:
            os.initgroups(account.user, account.gid)
        else:
            os.setgroups([])  # root's supplementary groups must not stay
        os.setresgid(account.gid, account.gid, account.gid)
        if account.uid is not None:
            os.setresuid(account.uid, account.uid, account.uid)
    except OSError as err:
        raise StartupError(f"cannot switch to {who}: {err.strerror}") from None
    if account.uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise StartupError(f"switched to {who}, but root privileges could be regained")


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
    """python-daemon's defaults (ignore SIGTSTP/SIGTTIN/SIGTTOU) without its SIGTERM."""
    signal_map: dict[int, object] = daemon.daemon.make_default_signal_map()
    signal_map.pop(signal.SIGTERM, None)
    return signal_map


def run_detached(settings: Settings) -> int:
    """Start echod as a daemon; return 0 once it serves. See the module docstring."""
    account = resolve_account(settings.user, settings.group)
    _ensure_stdio()
    inherited = _open_fds()
    os.umask(UMASK)
    log_path = settings.log_file or default_log_file()
    _make_dir(log_path.parent, "log file")
    log_file = logs.LogFile(log_path)
    logs.configure(settings.log_level, settings.log_format, log_file)
    log = logs.get_logger()
    pidfile = Pidfile(settings.pidfile or default_pidfile())
    service: Service | None = None
    try:
        pidfile.acquire()
        service = Service(settings, log_file=log_file)
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
    keep = (_open_fds() - inherited - {0, 1, 2, read_fd}) | {
        service.server.fileno(),
        log_file.fileno(),
        pidfile.fileno(),
        write_fd,
    }
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
    """Steps 7-10 in the forked child; never returns into the caller's code."""
    log = logs.get_logger()
    status = 1
    failure: str | None = None
    try:
        with open(os.devnull, "r+b", buffering=0) as devnull:
            context = daemon.DaemonContext(
                working_directory="/",
                umask=UMASK,
                detach_process=True,
                prevent_core=True,
                files_preserve=sorted(keep),
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
        removed = pidfile.release()
        if failure is not None:
            ready.fail(failure)
        log.info("exited", status=status, pidfile_removed=removed)
        with contextlib.suppress(Exception):
            log_file.flush()
        os._exit(status)


# -- echod stop / echod status -----------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _parser(prog: str, description: str) -> _Parser:
    parser = _Parser(prog=prog, description=description)
    parser.add_argument(
        "--pidfile",
        type=lambda t: Path(t).expanduser().absolute(),
        default=None,
        metavar="PATH",
        help=f"the daemon's pidfile (default: {default_pidfile()})",
    )
    return parser


def status_main(argv: Sequence[str]) -> int:
    """``echod status``: exit 0 running, 1 stale pidfile, 3 not running, 4 unknown."""
    parser = _parser(
        "echod status",
        "Is a detached echod running? (LSB exit codes: "
        "0 running, 1 not running but the pidfile remains, 3 not running, "
        "4 unknown)",
    )
    args = parser.parse_args(argv)
    state = inspect(args.pidfile or default_pidfile())
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
        type=_timeout,
        default=STOP_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for it to exit (default: {STOP_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    path: Path = args.pidfile or default_pidfile()
    state = inspect(path)
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
