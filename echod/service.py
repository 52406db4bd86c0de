"""The service lifecycle: serve until asked to stop, then stop gracefully.

:class:`Service` is built in two steps so that detaching can happen between
them: the constructor acquires every resource that can fail (the listening
socket, the control socket), and :meth:`Service.run` serves.

Lifecycle of :meth:`Service.run`, in order:

1. Install signal handlers. They only record the signal and wake the main
   loop (SIGTERM/SIGINT: stop; SIGHUP: reopen the log file, then reload the
   config file, :mod:`echod.reload`, or without one the TLS files). A second
   stop signal while stopping exits at once, status 1.
2. Start the accept loop and the janitor in a thread (``serve_forever``).
3. Start the operator interfaces: the control socket, the metrics endpoint
   (``metrics_listening``), and the stdin console when asked for.
4. Announce readiness: the ``listening`` event, ``READY=1`` to systemd, and
   the ``on_ready`` callback (the detaching parent waits for it).
5. Wait for a stop request: a signal, ``/shutdown``, or :meth:`request_stop`.
   Meanwhile, under ``WatchdogSec=``, send ``WATCHDOG=1`` at half the
   interval while the accept loop and the janitor both go round
   (:class:`~echod.systemd.Watchdog`); a ping withheld is logged
   (``watchdog_withheld``), and systemd then restarts echod.
6. Stop: ``STOPPING=1``; stop accepting; tell every client and close it;
   join the handlers within ``--shutdown-timeout``; close the operator
   interfaces.
7. Ignore SIGTERM, SIGINT and SIGHUP from now on, log ``stopped`` and return
   exit status 0 (also when handlers outlived the deadline: they are daemon
   threads, and that is logged as ``shutdown_incomplete``). Ignored, not left
   to Python: the interpreter's teardown puts its handled signals back to
   SIG_DFL, and a second SIGTERM then would kill echod by the signal.

Error handling: failures before step 4 raise
:class:`~echod.errors.EchodError`, which the CLI reports as one sentence.
Failures in client threads never reach this loop; they are logged by the
server. ``run`` must be called from the main thread (signal handlers).
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from echod import logs, pause, systemd, upgrade
from echod.admission import normalize
from echod.config import Settings
from echod.configfile import Source
from echod.connection import Connection
from echod.console import StdinConsole
from echod.control import ControlServer
from echod.errors import UpgradeFailed
from echod.logs import LogFile, Logger, get_logger
from echod.metrics import MetricsServer, metrics_registry
from echod.registry import Registry
from echod.reload import Commit, Outcome, Reloader, ReloadError
from echod.server import EchoServer, peer_host, tls_files
from echod.tls import CertInfo, TLSConfigError
from echod.upgrade import Inherited, Launch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
UPGRADE_SIGNAL = signal.SIGUSR2  # as nginx and gunicorn use it
# Descriptors besides one per client: std streams, listener, reserve, control
# socket and its sessions, log file, wake pipe, /proc reads by libraries.
NOFILE_HEADROOM = 64
MAIN_LOOP_WAKE = 5.0  # the main loop needs no wake-up but the watchdog's; a bound anyway


def raise_nofile_limit(max_clients: int, log: Logger) -> int:
    """Raise the soft open-files limit to the hard one; warn if ``max_clients`` cannot fit.

    Every client holds one descriptor, and the common default soft limit of
    1024 is below the default ``--max-clients`` plus headroom. Returns the
    soft limit in force. Never fails: a low limit is a warning
    (``nofile_limit_low``), and running out at runtime is handled by the
    server's back-off.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_clients + NOFILE_HEADROOM
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # keep the old soft limit; the warning below says what that means
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "nofile_limit_low",
            soft=soft,
            hard=hard,
            max_clients=max_clients,
            needed=needed,
            fits=max(0, soft - NOFILE_HEADROOM),
            detail="raise the hard open-files limit (ulimit -Hn, LimitNOFILE=) "
            "or lower --max-clients",
        )
    return soft


def _notify_status(clients: int) -> None:
    systemd.notify(f"STATUS={clients} clients")


class Service:
    """One echod instance: a server, its operator interfaces and its lifecycle."""

    def __init__(
        self,
        settings: Settings,
        log_file: LogFile | None = None,
        source: Source | None = None,
        launch: Launch | None = None,
        inherited: Inherited | None = None,
    ) -> None:
        """``source``: where ``settings`` came from, for reloads. ``launch``: how
        echod was started (None: it cannot upgrade itself). ``inherited``: what
        the echod this one replaces handed over (an upgrade)."""
        self.log: Logger = get_logger()
        self.reloader = Reloader(settings, source, self.log)
        self.log_file = log_file
        self.launch = launch
        self.nofile_limit = raise_nofile_limit(settings.max_clients, self.log)
        self.registry: Registry[Connection] = Registry()
        if inherited is not None:
            adopted: socket.socket | None = inherited.listener
            self.socket_activated = inherited.state.socket_activated
        else:
            sockets = systemd.listen_sockets()  # socket activation: serve what systemd passed
            adopted = sockets[0] if sockets else None
            self.socket_activated = adopted is not None
        self.server = EchoServer(settings, self.registry, listener=adopted)
        self.admission = self.server.admission  # its refusal counts, for /stats
        self.pidfile_fd: int | None = None  # a detached echod's, handed over on upgrade
        self.successor_pid: int | None = None  # set once an upgrade handed everything over
        self.upgraded_from = inherited.state.pid if inherited is not None else None
        self._upgrade_lock = threading.Lock()
        self._gate: threading.Event | None = None  # adopted clients' handlers wait for it
        self._stop_reason: str | None = None
        self._signals: list[int] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closers: list[Callable[[], None]] = []
        self._console: StdinConsole | None = None
        if systemd.notifying():
            self.registry.on_change = _notify_status
        self.metrics = self._open_metrics(inherited.metrics if inherited else None)
        self.control = self._open_control(inherited.control if inherited else None)
        if inherited is not None:  # last: from here on the clients are held for serving
            self._adopt(inherited)
        self.reloader.add(self._apply_logging)
        self.reloader.add(lambda old, new: lambda: self.server.apply(new))
        self.reloader.add(self._apply_max_clients)
        self.reloader.add(self._apply_tls)

    @property
    def settings(self) -> Settings:
        """The settings in force: those of the last reload."""
        return self.reloader.current

    # -- reloading -----------------------------------------------------------

    def reload(self, trigger: str = "operator") -> Outcome:
        """Re-read the config file and apply it; raises :class:`ReloadError`, changing nothing."""
        return self.reloader.reload(trigger)

    def _apply_logging(self, old: Settings, new: Settings) -> Commit | None:
        if (old.log_level, old.log_format) == (new.log_level, new.log_format):
            return None
        stream = self.log_file if self.log_file is not None else sys.stderr
        return lambda: logs.configure(new.log_level, new.log_format, stream)

    def _apply_max_clients(self, old: Settings, new: Settings) -> Commit | None:
        if new.max_clients <= old.max_clients:
            return None

        def commit() -> None:
            self.nofile_limit = raise_nofile_limit(new.max_clients, self.log)

        return commit

    def _adopt(self, inherited: Inherited) -> None:
        state = inherited.state
        self.registry.restore(state.totals)
        self.admission.restore_refused(state.admission_refused)
        now, s = time.monotonic(), self.settings
        conns = []
        for c in state.clients:
            conn = Connection.restore(
                c, inherited.clients[c.id], s.send_timeout, s.max_line, self.server.pause, now
            )
            if c.admitted and self.server.gated:  # counts towards its source's limit here too
                conn.admitted = self.admission.adopt(normalize(peer_host(conn.peer)))
            conns.append(conn)
        self._gate = self.server.adopt(conns)

    def _apply_tls(self, old: Settings, new: Settings) -> Commit | None:
        """At every reload, load the TLS files anew (renewed under the same names, or new ones).

        A file that does not load fails the whole reload (``tls_reload_failed``,
        then ``config_reload_failed``); TLS cannot be turned on or off live.
        """
        tls = self.server.tls
        files = tls_files(new)
        if (tls is None) != (files is None):
            raise ReloadError("turning TLS on or off needs a restart")
        if tls is None or files is None:
            return None
        try:
            prepared = tls.prepare(files)
        except TLSConfigError as err:
            self.log.error("tls_reload_failed", detail=str(err))
            raise ReloadError(str(err)) from None

        def commit() -> None:
            tls.install(prepared, new.tls_handshake_timeout)
            self._log_tls_reloaded(prepared.info)

        return commit

    def _log_tls_reloaded(self, info: CertInfo) -> None:
        self.log.info("tls_reloaded", serial=info.serial_hex, not_after=info.not_after.isoformat())

    # -- operator interfaces ------------------------------------------------

    def _open_control(self, inherited: socket.socket | None) -> ControlServer | None:
        """Bind the control socket now, so a bad path fails before detaching."""
        path = self.settings.control_socket
        if path is None:
            if inherited is not None:
                inherited.close()
            return None
        control = ControlServer(path, self, sock=inherited)
        self._closers.append(control.close)
        return control

    def _open_metrics(self, inherited: socket.socket | None) -> MetricsServer | None:
        """Bind --metrics-listen now, so a bad address fails before detaching."""
        listen = self.settings.metrics_listen
        if listen is None:
            if inherited is not None:
                inherited.close()
            return None
        server = MetricsServer(
            listen, metrics_registry(self.registry, lambda: self.settings), sock=inherited
        )
        self._closers.append(server.close)
        return server

    def _start_console(self) -> None:
        console = StdinConsole(self)
        console.start()
        self._console = console
        self._closers.append(console.close)

    def close(self) -> None:
        """Release what the constructor acquired, for a start abandoned before :meth:`run`."""
        for close in reversed(self._closers):
            close()
        self._closers.clear()
        self.server.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- lifecycle ---------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Ask the main loop to stop; safe from any thread and from signal handlers."""
        if self._stop_reason is None:
            self._stop_reason = reason
        try:
            os.write(self._wake_w, b"s")
        except OSError:
            pass  # the pipe is full: the main loop is awake anyway

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in STOP_SIGNALS and self._stop_reason is not None and self._stopping:
            # A second stop signal while stopping: the operator insists. The
            # terminal first gets back the modes readline took (closing twice is harmless).
            if self._console is not None:
                self._console.close()
            os._exit(1)
        self._signals.append(signum)
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    _stopping = False
    _watchdog: systemd.Watchdog | None = None

    # -- upgrading ---------------------------------------------------------

    def upgrade(self) -> str:
        """Hand every client to the echod now installed (echod.upgrade); the OK answer.

        Raises :class:`UpgradeFailed`; this echod then serves on as before.
        From any thread but the main one (it waits for the successor).
        """
        if self.launch is None:
            raise UpgradeFailed("this echod was not started by the echod command")
        if self.server.tls is not None:
            # A TLS session's keys and sequence numbers live in this process's
            # OpenSSL: no successor could go on encrypting for the client.
            reason = "TLS sessions cannot move to another process: restart instead"
            self.log.error("upgrade_failed", detail=reason)
            raise UpgradeFailed(reason)
        if not self._upgrade_lock.acquire(blocking=False):
            raise UpgradeFailed("another upgrade is in progress")
        try:
            if self._stop_reason is not None:
                raise UpgradeFailed("echod is stopping")
            done = upgrade.upgrade(
                self.launch,
                self.server,
                self.registry,
                self.log,
                control=self.control.listening_socket if self.control is not None else None,
                metrics=self.metrics.listening_socket if self.metrics is not None else None,
                pidfile_fd=self.pidfile_fd,
                socket_activated=self.socket_activated,
            )
            self.successor_pid = done.new_pid
            if self.control is not None:
                self.control.leave_file()  # the successor listens on it now
            self.request_stop("upgraded")
        finally:
            self._upgrade_lock.release()
        return f"OK upgraded pid {done.old_pid} -> {done.new_pid}"

    def _upgrade_on_signal(self) -> None:
        try:
            self.upgrade()
        except UpgradeFailed:
            pass  # logged as upgrade_failed; nobody else to tell

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Serve until stopped; see the module docstring for the steps."""
        for sig in (*STOP_SIGNALS, signal.SIGHUP, UPGRADE_SIGNAL):
            signal.signal(sig, self._on_signal)
        pause.install_wake_handler()
        # A signal taken by another thread (e.g. pending across SIGSTOP/SIGCONT) must
        # still wake the main loop at once; Python runs handlers on the main thread only.
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        serve = threading.Thread(target=self.server.serve_forever, name="echod-accept", daemon=True)
        serve.start()
        if self.control is not None:
            self.control.start()
        if self.metrics is not None:
            self.metrics.start()
            host, port = self.metrics.address
            self.log.info("metrics_listening", host=host, port=port)
        if self._console_wanted():
            self._start_console()
        s = self.settings
        tls = self.server.tls
        if tls is not None:
            self.log.info(
                "tls_loaded",
                serial=tls.info.serial_hex,
                not_after=tls.info.not_after.isoformat(),
                client_ca=str(s.tls_client_ca) if s.tls_client_ca else None,
                min_version=s.tls_min_version,
            )
        self.log.info(
            "listening",
            host=self.server.host,
            port=self.server.port,
            pid=os.getpid(),
            socket_activated=self.socket_activated,
            control_socket=str(s.control_socket) if s.control_socket else None,
            max_clients=s.max_clients,
            max_line=s.max_line,
            clients=len(self.registry),
            upgraded_from=self.upgraded_from,
            tls=tls is not None,
        )
        interval = systemd.watchdog_interval()  # READY=1 arms systemd's side
        if interval is not None:
            self._watchdog = systemd.Watchdog(interval, self.server.progress)
        if on_ready is not None:
            on_ready()  # a successor: after this, the old echod has let go
        if self._gate is not None:
            self._gate.set()  # the clients handed over are served from here on
        systemd.notify("READY=1")
        if self.registry.on_change is not None:  # systemctl status shows a count from the start
            self.registry.on_change(len(self.registry))
        self._wait_for_stop()
        return self._shutdown()

    def _console_wanted(self) -> bool:
        if self.settings.console is not None:
            return self.settings.console
        return self.settings.foreground and os.isatty(0)

    def _wait_for_stop(self) -> None:
        while self._stop_reason is None:
            select.select([self._wake_r], [], [], self._check_watchdog())
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    self._on_sighup()
                elif signum == UPGRADE_SIGNAL:
                    threading.Thread(
                        target=self._upgrade_on_signal, name="echod-upgrade", daemon=True
                    ).start()
                else:
                    self.request_stop(signal.Signals(signum).name)

    def _check_watchdog(self) -> float:
        """Ping systemd's watchdog if due; how long the main loop may sleep."""
        dog = self._watchdog
        if dog is None:
            return MAIN_LOOP_WAKE
        was = dog.stalled
        wait = dog.check()
        if dog.stalled and dog.stalled != was:
            self.log.warning("watchdog_withheld", stalled=dog.stalled, every=dog.every)
        return min(wait, MAIN_LOOP_WAKE)

    def _reload_tls(self) -> None:
        """Swap in a TLS context from the files as they are now; a bad file changes nothing."""
        tls = self.server.tls
        if tls is None:
            return
        try:
            info = tls.reload()
        except TLSConfigError as err:
            self.log.error("tls_reload_failed", detail=str(err))
            return
        self._log_tls_reloaded(info)

    def _on_sighup(self) -> None:
        """Reopen the log file (for logrotate), then reload the config file or the TLS files."""
        source = self.reloader.source
        has_config = source is not None and source.path is not None
        if self.log_file is None and not has_config and self.server.tls is None:
            self.log.info("sighup_ignored", detail="no log file to reopen, no config file to read")
            return
        if self.log_file is not None:
            self._reopen_logs(self.log_file)
        if has_config:
            with contextlib.suppress(ReloadError):  # logged as config_reload_failed
                self.reload("SIGHUP")  # the TLS files too (_apply_tls)
        else:
            self._reload_tls()  # no config file: SIGHUP still renews the certificate

    def _reopen_logs(self, log_file: LogFile) -> None:
        try:
            log_file.reopen()
        except Exception as err:  # keep logging to the old file rather than die
            self.log.error("log_reopen_failed", path=str(log_file.path), detail=str(err))
            return
        self.log.info("log_reopened", path=str(log_file.path))

    def _shutdown(self) -> int:
        with self._upgrade_lock:  # an upgrade in progress ends first, one way or the other
            self._stopping = True
        clients = len(self.registry)
        self.log.info("stopping", reason=self._stop_reason, clients=clients)
        if self.successor_pid is None:
            systemd.notify("STOPPING=1")
            complete = self.server.stop(self.settings.shutdown_timeout)
        else:  # the successor is the service now; these clients were ending anyway
            complete = self.server.retire(self.settings.shutdown_timeout)
        for close in reversed(self._closers):
            close()
        if not complete:
            self.log.warning(
                "shutdown_incomplete",
                detail="handlers outlived the deadline",
                remaining=len(self.registry),
            )
        # Step 7: the interpreter's teardown (_PySignal_Fini) resets handled
        # signals to SIG_DFL, but leaves ignored ones ignored.
        for sig in (*STOP_SIGNALS, signal.SIGHUP, UPGRADE_SIGNAL):
            signal.signal(sig, signal.SIG_IGN)
        stats = self.registry.stats()
        self.log.info(
            "stopped",
            reason=self._stop_reason,
            served=stats.total_accepted,
            lines_in=stats.lines_in,
            uptime=round(stats.uptime, 3),
        )
        signal.set_wakeup_fd(-1)  # before its descriptor is closed and maybe reused
        os.close(self._wake_r)
        os.close(self._wake_w)
        return 0
