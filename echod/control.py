"""The control socket: the operator's way into an echod without a terminal.

Design
------
The control socket is how an operator reaches an echod that has no terminal:
a Unix stream socket, never a TCP port. It speaks the command language of
:mod:`echod.commands`, one command a line. Its clients (``echod ctl``,
``echod console``) are in :mod:`echod.ctl`.

Framing: the answer to each command is its lines (the first starts with
``OK`` or ``ERR``), then one empty line. No answer line is ever empty, so a
client reads until the empty line; with ``socat`` the empty line simply
separates answers. A blank command line gets no answer. A connection that is
refused gets one ``ERR ...`` answer, framed the same way, and is closed.

Who may connect, in layers:

1. The file: the socket is mode 0600 inside a directory that echod creates
   mode 0700 (whatever the umask); an existing directory must belong to
   echod's user or root and must not be writable by anybody else, so nobody
   can replace the socket under us.
2. The peer: ``SO_PEERCRED`` gives the uid of the connecting process; only
   echod's own euid and root are served, anybody else gets
   ``ERR permission denied`` and a ``control_refused`` warning.

At startup an existing socket file is probed: if something accepts a
connection, another echod owns it and we refuse to start; if nothing
answers, it is stale (a killed echod) and is replaced. At exit the file is
removed, unless another process has replaced it meanwhile.

Threads: one accepts (``poll`` on the listener and a wake pipe), one runs each
session, at most :data:`MAX_SESSIONS` at once; the others are told
``ERR too many operator sessions`` and closed. A session ends when the
operator closes it, after :data:`IDLE_TIMEOUT` seconds without a command, or
when echod stops. A session writes with a deadline (``--send-timeout``), so
an operator that stops reading only stalls its own session. Nothing here
touches the registry lock except through the commands.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

from echod.commands import CommandLines, Commands, Operated, commands_for, decode, encode
from echod.errors import StartupError
from echod.logs import Logger, get_logger

MAX_SESSIONS = 4
IDLE_TIMEOUT = 300.0  # seconds a session may stay without a command
PROBE_TIMEOUT = 1.0  # a live echod accepts at once; no answer in this time is "alive but busy"
SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, without the NUL
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlServer:
    """The listening control socket and its operator sessions.

    The constructor creates the socket (so a bad path fails before echod
    detaches) and raises :class:`StartupError` with one sentence on any
    problem; :meth:`start` serves; :meth:`close` stops and removes the file.
    """

    def __init__(
        self,
        path: Path,
        service: Operated,
        *,
        max_sessions: int = MAX_SESSIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: the listening socket an upgrade handed over, already bound at ``path``."""
        self.path = Path(path)
        self.service = service
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.log: Logger = get_logger()
        self._sessions: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()  # guards _sessions only
        self._closed = False
        self._accept_failed_at = 0.0  # rate-limits control_accept_failed (monotonic)
        self._thread: threading.Thread | None = None
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            raise StartupError(
                f"control socket path {self.path} is too long (at most {SUN_PATH_MAX} bytes)"
            )
        if sock is None:
            _private_dir(self.path.parent)
            self._remove_stale()
            sock = self._bind()
        self._sock = sock
        st = os.stat(self.path)
        self._identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- setting up ----------------------------------------------------------

    def _remove_stale(self) -> None:
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise StartupError(f"cannot use control socket {path}: {err.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(
                f"{path} exists and is not a socket; remove it or choose another --control-socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens: a leftover of an echod that did not exit cleanly
        except TimeoutError:
            raise StartupError(
                f"another echod is already listening on control socket {path}"
                " (it did not answer in time)"
            ) from None
        except OSError as err:
            raise StartupError(f"cannot check control socket {path}: {err.strerror}") from None
        else:
            raise StartupError(f"another echod is already listening on control socket {path}")
        finally:
            probe.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            raise StartupError(
                f"cannot remove stale control socket {path}: {err.strerror}"
            ) from None
        self.log.info("control_socket_stale_removed", path=str(path))

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            # Nobody can connect before listen(), so the mode is set before anyone can.
            os.chmod(self.path, 0o600)
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise StartupError(
                f"cannot listen on control socket {self.path}: {err.strerror or err}"
            ) from None
        return sock

    @property
    def listening_socket(self) -> socket.socket:
        """The listening socket (an upgrade hands it over)."""
        return self._sock

    def leave_file(self) -> None:
        """Another echod listens on the same socket now: :meth:`close` keeps the file."""
        self._identity = None

    # -- serving ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._accept_loop, name="echod-control", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            ready = {fd for fd, _ in poller.poll()}
            if self._closed or self._wake_r in ready:
                break
            try:
                conn, _ = self._sock.accept()
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    now = time.monotonic()
                    if now - self._accept_failed_at > 5.0:  # once per 5 s, like the server
                        self._accept_failed_at = now
                        self.log.error("control_accept_failed", detail=err.strerror)
                    select.select([self._wake_r], [], [], 0.5)  # back off, stay stoppable
                continue
            try:
                self._admit(conn)
            except Exception:
                self.log.error("control_accept_failed", exc_info=True)
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid not in (os.geteuid(), 0):
            self.log.warning(
                "control_refused", reason="permission_denied", uid=uid, gid=gid, pid=pid
            )
            _refuse(conn, "permission denied")
            return
        thread = threading.Thread(
            target=self._session, args=(conn, pid, uid), name=f"echod-operator-{pid}", daemon=True
        )
        with self._lock:
            admitted = len(self._sessions) < self.max_sessions and not self._closed
            if admitted:
                self._sessions[conn] = thread
        if not admitted:
            self.log.warning(
                "control_refused",
                reason="too_many_sessions",
                uid=uid,
                pid=pid,
                max_sessions=self.max_sessions,
            )
            _refuse(conn, f"too many operator sessions (max {self.max_sessions})")
            return
        thread.start()

    def _session(self, conn: socket.socket, pid: int, uid: int) -> None:
        log = self.log.bind(source="control", uid=uid, pid=pid)
        log.debug("control_session_opened")
        commands = commands_for(self.service, log)
        reason = "closed"
        try:
            reason = self._serve_session(conn, commands)
        except OSError:
            reason = "reset"
        except Exception as err:  # a bug: end this session, keep echod and the others
            reason = "error"
            log.error("control_session_failed", error=type(err).__name__, detail=str(err))
        finally:
            with self._lock:
                self._sessions.pop(conn, None)
            conn.close()
            log.debug("control_session_closed", reason=reason)

    def _serve_session(self, conn: socket.socket, commands: Commands[Any]) -> str:
        """Answer command lines until the operator leaves; returns why the session ended."""
        lines = CommandLines(commands.max_command)
        send_timeout = self.service.settings.send_timeout
        while True:
            conn.settimeout(self.idle_timeout)
            try:
                data = conn.recv(65536)
            except TimeoutError:
                conn.settimeout(send_timeout)
                conn.sendall(b"ERR idle timeout, closing\n\n")
                return "idle_timeout"
            if data:
                answers = [
                    commands.too_long() if line is None else commands.execute(decode(line))
                    for line in lines.feed(data)
                ]
            else:  # end of input: a last command may lack its newline
                last = lines.end()
                answers = [] if last is None else [commands.execute(decode(last))]
            reply = b"".join(encode(a) + b"\n\n" for a in answers if a)
            if reply:
                conn.settimeout(send_timeout)
                conn.sendall(reply)
            if not data:
                return "closed"

    # -- stopping ----------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, end the sessions (letting an answer in progress out), remove the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            sessions = list(self._sessions.items())
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(2.0)
        self._sock.close()
        # SHUT_RD wakes each session's recv with end of input but lets an answer
        # being written (the OK to /shutdown) reach the operator.
        for conn, _ in sessions:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        for conn, thread in sessions:
            thread.join(1.0)
            if thread.is_alive():
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._unlink()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _unlink(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:  # not a newer echod's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except PermissionError:  # created as root, then --user dropped the right to remove it
            self.log.info(
                "control_socket_left",
                path=str(self.path),
                detail="no permission to remove it; the next start replaces it",
            )
        except OSError as err:
            self.log.warning("control_socket_not_removed", path=str(self.path), detail=err.strerror)


def _private_dir(directory: Path) -> None:
    """Create ``directory`` mode 0700, or check that an existing one is safe to use."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(directory, 0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        return
    except FileExistsError:
        pass
    except OSError as err:
        raise StartupError(
            f"cannot create control socket directory {directory}: {err.strerror}"
        ) from None
    try:
        st = os.stat(directory)
    except OSError as err:
        raise StartupError(
            f"cannot use control socket directory {directory}: {err.strerror}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"control socket directory {directory} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise StartupError(
            f"control socket directory {directory} belongs to another user (uid {st.st_uid})"
        )
    if st.st_mode & 0o022:
        raise StartupError(
            f"control socket directory {directory} is writable by other users; "
            "choose a private directory for --control-socket"
        )


def _refuse(conn: socket.socket, reason: str) -> None:
    """One framed ERR answer, without ever blocking the accept loop, then close."""
    with contextlib.suppress(OSError):
        conn.send(f"ERR {reason}\n\n".encode(), socket.MSG_DONTWAIT)
    conn.close()
