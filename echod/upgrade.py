"""Upgrades: start the echod now installed and hand it every client, without dropping one.

Design
------
``echod ctl upgrade``, ``/upgrade`` on either console and SIGUSR2 all end in
:func:`upgrade`, which runs in the echod being replaced (O) and does:

1. Start the successor (S): ``sys.executable -m echod`` with the arguments O
   was started with, from the directory O was started in (relative paths
   mean the same), with one end of a socketpair as ``$ECHOD_HANDOVER_FD``,
   and its stderr on a pipe until it is ready (a copy of the real one is
   ``$ECHOD_HANDOVER_STDERR``). S is started through a process that forks
   it and exits (:data:`_SPAWN`), so S is the service manager's child, not
   O's: systemd waits for (and so stops gracefully) only a main process
   that is its own child. ``sys.executable -m echod`` rather than
   ``argv[0]``: a detached O runs in ``/``, where a relative ``argv[0]``
   means nothing, and it is the same interpreter importing the echod package
   installed now, whichever way O was started.
2. Wait for S's ``hello``: S parsed its arguments and config file. Until
   then nothing is paused; a successor that fails here costs nothing.
3. Pause (:meth:`EchoServer.pause_clients`): stop accepting (the listening
   socket stays open: new clients wait in its backlog), stop the janitor,
   park every handler (:mod:`echod.pause`).
4. Send the listener, the control socket, the pidfile's descriptor (its
   ``flock`` goes with it) and every parked client's socket with its state
   (:mod:`echod.handover`).
5. Wait for S's ``ready``: S serves every client and accepts.
6. Let go: tell systemd ``MAINPID=S`` (O is still the main process, so
   ``NotifyAccess=main`` suffices), close O's copies of the descriptors, send
   ``commit``, log ``upgrade_done``. S then sends ``READY=1`` as the main
   process. The service retires: clients that were already ending finish in
   O, then O exits.

The pause clients see lasts from step 3 to step 5.

Error handling
--------------
Any failure before step 6 raises :class:`UpgradeFailed` with the
successor's own error (the last line it wrote to stderr, which is where
``echod: <sentence>`` and tracebacks go) or what went wrong; S is killed if
it still runs, every parked client is served again by O (the pause is called
off), accepting goes on, and ``upgrade_failed`` is logged. After step 6 O has
nothing left to undo.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from echod import handover, systemd
from echod.connection import Connection
from echod.errors import UpgradeFailed
from echod.handover import Channel, HandoverError, ServerState
from echod.logs import Logger
from echod.pause import PauseTimeout
from echod.pidfile import is_alive
from echod.registry import Registry
from echod.server import EchoServer

# Python must start and import echod, and 1,000 client threads may already
# compete for a 2-core machine: generous, and nothing is paused meanwhile.
START_TIMEOUT = 60.0
PAUSE_TIMEOUT = 5.0  # for every handler to park; they need one read's work at most
# From the state sent to S serving: S starts one thread per client.
READY_TIMEOUT = 30.0
EXIT_WAIT = 5.0  # for a failed successor to exit, so its last words are read
STDERR_TAIL = 20  # lines of a failed successor's stderr kept for the answer
_SENTENCE = re.compile(r"(<\d>)?echod: ")  # cli's error line, journal priority and all
_LOG_LINE = re.compile(r"\{|\d\d:\d\d:\d\d \[")  # a JSON or console log event


@dataclass(frozen=True)
class Launch:
    """How this echod was started, so its successor is started the same way."""

    argv: tuple[str, ...]  # the arguments, without the program name
    cwd: str

    @classmethod
    def here(cls, argv: Sequence[str]) -> Launch:
        return cls(tuple(argv), os.getcwd())

    def command(self) -> list[str]:
        return [sys.executable, "-m", "echod", *self.argv]


@dataclass(frozen=True)
class Upgraded:
    old_pid: int
    new_pid: int
    clients: int  # handed over
    pause: float  # seconds from parking the handlers to the successor serving
    parked: float  # of which parking every handler took
    sent: float  # and sending the state
    unfinished: int  # clients handed over in the middle of a line
    queued: int  # lines handed over unsent (for clients not reading)


@dataclass
class Inherited:
    """What a successor received: the state, and the descriptors made sockets again."""

    state: ServerState
    listener: socket.socket
    control: socket.socket | None
    metrics: socket.socket | None
    pidfile_fd: int | None
    clients: dict[int, socket.socket]  # by client id

    @classmethod
    def take(cls, state: ServerState, fds: list[int]) -> Inherited:
        """Wrap the descriptors :func:`handover.recv_state` returned; they are owned here now."""

        def sock(i: int) -> socket.socket:
            return socket.socket(fileno=fds[i])

        return cls(
            state=state,
            listener=sock(state.listener),
            control=None if state.control is None else sock(state.control),
            metrics=None if state.metrics is None else sock(state.metrics),
            pidfile_fd=None if state.pidfile is None else fds[state.pidfile],
            clients={c.id: sock(c.fd) for c in state.clients},
        )


# The successor is started through this, so that it is not our child: its
# parent exits at once, and it becomes the child of the service manager (PID 1
# or the nearest subreaper). systemd only waits for a main process that is its
# child: with one that is not (MAINPID= naming our child), a stop sends
# SIGTERM and then, having nothing to wait for, SIGKILL at once.
_SPAWN = (
    "import os, sys\nif os.fork() == 0:\n    os.execv(sys.argv[1], sys.argv[1:])\nos._exit(0)\n"
)


class Successor:
    """The starting echod, its channel and its stderr until it is ready."""

    def __init__(self, launch: Launch) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        real_stderr = os.dup(2)  # inheritable only through pass_fds
        env = {
            **os.environ,
            handover.CHANNEL_ENV: str(theirs.fileno()),
            handover.STDERR_ENV: str(real_stderr),
        }
        if env.get("WATCHDOG_PID") == str(os.getpid()):
            # systemd's watchdog is meant for the main process, which S becomes
            # (sd_watchdog_enabled(3): no WATCHDOG_PID means "this process").
            del env["WATCHDOG_PID"]
        self.pid: int | None = None  # from its hello
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        try:
            try:
                cwd = launch.cwd if os.path.isdir(launch.cwd) else "/"
                spawner = subprocess.Popen(
                    [sys.executable, "-I", "-c", _SPAWN, *launch.command()],
                    cwd=cwd,
                    env=env,
                    pass_fds=(theirs.fileno(), real_stderr),
                    stdin=subprocess.DEVNULL,
                    stderr=err_w,
                )
                spawner.wait(EXIT_WAIT)  # it only forks
            except (OSError, subprocess.TimeoutExpired) as err:
                os.close(err_r)
                why = err.strerror if isinstance(err, OSError) else None
                raise UpgradeFailed(f"cannot start {sys.executable}: {why or err}") from None
        finally:
            theirs.close()
            os.close(err_w)
            os.close(real_stderr)
        self.channel = Channel(ours)
        self._stderr = threading.Thread(
            target=self._copy_stderr, args=(err_r,), name="echod-upgrade-stderr", daemon=True
        )
        self._stderr.start()

    def _copy_stderr(self, fd: int) -> None:
        """Pass S's stderr on to ours (the journal keeps it) and remember its last lines."""
        pending = b""
        try:
            while chunk := os.read(fd, 65536):
                try:
                    os.write(2, chunk)
                except OSError:
                    pass  # our stderr is gone: still keep the lines for the answer
                pending += chunk
                *lines, pending = pending.split(b"\n")
                self._tail.extend(line.decode("utf-8", "replace") for line in lines)
            if pending:
                self._tail.append(pending.decode("utf-8", "replace"))
        except OSError:
            pass  # the pipe broke: what we have is all there is
        finally:
            os.close(fd)

    def hello(self) -> None:
        """Wait for the successor's hello: it parsed its arguments and config file."""
        hello = self.channel.recv(START_TIMEOUT, "hello")
        handover.check_version(hello)
        self.pid = int(hello["pid"])

    def failure(self, what: str) -> str:
        """Why the successor failed, in its own words when it left any."""
        self.kill()
        self._stderr.join(EXIT_WAIT)  # its end: the successor exited
        words = [line.strip() for line in self._tail if line.strip()]
        # cli's "echod: <sentence>" comes last; else a traceback's last line.
        # Log events (JSON or key=value lines) say less than the exit status.
        for line in reversed(words):
            if sentence := _SENTENCE.match(line):
                return line[sentence.end() :]
        if words and not _LOG_LINE.match(words[-1]):
            return words[-1]
        return what

    def kill(self) -> None:
        """Close the channel (a successor waiting on it exits), then kill it if it stays."""
        self.channel.close()
        if self.pid is None:
            return  # it never said hello: it exits when it finds the channel closed
        deadline = time.monotonic() + EXIT_WAIT
        while is_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it just went


def server_state(
    server: EchoServer,
    registry: Registry[Connection],
    parked: list[Connection],
    control: socket.socket | None,
    metrics: socket.socket | None,
    pidfile_fd: int | None,
    socket_activated: bool,
) -> tuple[ServerState, list[int]]:
    """The state to send and the descriptors it refers to, in order."""
    fds = [server.socket.fileno()]
    control_at = metrics_at = pidfile_at = None
    if control is not None:
        control_at = len(fds)
        fds.append(control.fileno())
    if metrics is not None:
        metrics_at = len(fds)
        fds.append(metrics.fileno())
    if pidfile_fd is not None:
        pidfile_at = len(fds)
        fds.append(pidfile_fd)
    now = time.monotonic()
    clients = []
    for conn in parked:
        clients.append(conn.state(len(fds), now))
        fds.append(conn.sock.fileno())
    state = ServerState(
        pid=os.getpid(),
        listener=0,
        control=control_at,
        pidfile=pidfile_at,
        metrics=metrics_at,
        totals=registry.counters(),
        socket_activated=socket_activated,
        clients=clients,
        admission_refused=dict(server.admission.refused),
    )
    return state, fds


def upgrade(
    launch: Launch,
    server: EchoServer,
    registry: Registry[Connection],
    log: Logger,
    control: socket.socket | None = None,
    pidfile_fd: int | None = None,
    socket_activated: bool = False,
    metrics: socket.socket | None = None,
) -> Upgraded:
    """Hand everything to a new echod; see the module docstring. Raises :class:`UpgradeFailed`."""
    log.info("upgrade_started", command=launch.command(), clients=len(registry))
    try:
        done = _upgrade(launch, server, registry, control, metrics, pidfile_fd, socket_activated)
    except UpgradeFailed as err:
        log.error("upgrade_failed", detail=str(err))
        raise
    log.info(
        "upgrade_done",
        pid=done.new_pid,
        clients=done.clients,
        pause=round(done.pause, 4),
        parked_in=round(done.parked, 4),
        sent_in=round(done.sent, 4),
        unfinished=done.unfinished,
        queued=done.queued,
    )
    return done


def _upgrade(
    launch: Launch,
    server: EchoServer,
    registry: Registry[Connection],
    control: socket.socket | None,
    metrics: socket.socket | None,
    pidfile_fd: int | None,
    socket_activated: bool,
) -> Upgraded:
    successor = Successor(launch)
    channel = successor.channel
    try:
        successor.hello()
    except HandoverError as err:
        raise UpgradeFailed(successor.failure(str(err))) from None
    paused_at = time.monotonic()
    try:
        parked = server.pause_clients(PAUSE_TIMEOUT)
    except PauseTimeout as err:
        successor.failure("")
        raise UpgradeFailed(str(err)) from None
    parked_in = time.monotonic() - paused_at
    try:
        state, fds = server_state(
            server, registry, parked, control, metrics, pidfile_fd, socket_activated
        )
        handover.send_state(channel, state, fds)
        sent_in = time.monotonic() - paused_at - parked_in
        channel.recv(READY_TIMEOUT, "ready")
    except HandoverError as err:
        server.resume()
        raise UpgradeFailed(successor.failure(str(err))) from None
    except BaseException:
        server.resume()
        successor.failure("")
        raise
    pause = time.monotonic() - paused_at
    assert successor.pid is not None
    registry.on_change = None  # STATUS= comes from S now; ours would be refused
    systemd.notify(f"MAINPID={successor.pid}")
    server.let_go()
    try:
        channel.send({"type": "commit"})
    except HandoverError:
        pass  # S serves already; it goes on without the word
    channel.close()
    return Upgraded(
        os.getpid(),
        successor.pid,
        len(parked),
        pause,
        parked_in,
        sent_in,
        unfinished=sum(1 for c in state.clients if c.pending),
        queued=sum(len(c.queued) for c in state.clients),
    )
