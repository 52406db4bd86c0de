"""A real HAProxy on loopback, for the PROXY protocol tests.

:class:`HAProxy` writes a configuration into a private directory, starts
Debian's ``haproxy`` in the foreground (``-db``) and waits until its stats
socket answers, which HAProxy opens only once its configuration is loaded
and its listeners are up. Its frontend listens on a socket this process
bound to port 0 on 127.0.0.1 and hands over (``bind fd@N``), so there is no
race for a free port. :meth:`HAProxy.stop` ends it by PID.

``send_proxy`` is the server-line keyword: ``send-proxy`` (v1) or
``send-proxy-v2``. With ``check=True`` HAProxy also health-checks the backend
every 200 ms; it puts a header on those connections too (v2: ``LOCAL``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

TIMEOUT = 10.0
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def available() -> bool:
    return os.access(HAPROXY, os.X_OK)


CONFIG = """\
global
    maxconn 256
    stats socket {stats} mode 600 level operator
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout check 2s
frontend front
    bind fd@{fd}
    default_backend back
backend back
    server echod {backend_host}:{backend_port} {send_proxy}{check}
"""


class HAProxy:
    """One HAProxy process in front of ``backend_port``; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        backend_port: int,
        send_proxy: str = "send-proxy-v2",
        backend_host: str = "127.0.0.1",
        check: bool = False,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self.listener.getsockname()[:2]
        self.stats = workdir / "stats.sock"
        fd = self.listener.fileno()
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(
            CONFIG.format(
                stats=self.stats,
                fd=fd,
                backend_host=backend_host,
                backend_port=backend_port,
                send_proxy=send_proxy,
                check=" check inter 200ms" if check else "",
            )
        )
        self.log = (workdir / "haproxy.log").open("wb")
        self.proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            pass_fds=(fd,),
        )
        self.pid = self.proc.pid
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.proc.returncode}): {self.output()}")
            if self._show_info().startswith("Name: HAProxy"):
                return
            time.sleep(0.02)
        raise AssertionError(f"haproxy not ready within {TIMEOUT}s: {self.output()}")

    def _show_info(self) -> str:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(TIMEOUT)
                sock.connect(str(self.stats))
                sock.sendall(b"show info\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError:
            return ""
        return b"".join(chunks).decode("utf-8", "replace")

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "haproxy.log").read_text(errors="replace")[-2000:]

    def connect(self, source: str = "127.0.0.2") -> socket.socket:
        """A client socket bound to ``source`` (all of 127/8 is loopback), connected to HAProxy."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.bind((source, 0))
        sock.connect((self.host, self.port))
        return sock

    def stop(self) -> None:
        """End HAProxy by its PID: SIGTERM (its immediate stop), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        self.listener.close()
        self.log.close()
