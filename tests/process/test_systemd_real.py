"""echod under a real systemd: a Debian 12 machine booted with systemd-nspawn.

The machine (tests/process/nspawn.py) is booted once for the module; echod
is installed into it offline, from wheels built on the host, exactly as
docs/deploy.md says (a venv in /opt/echod, the symlink, the units and
/etc/default/echod copied from this checkout). Each test starts from the
installed state (:func:`echod`) and checks one thing systemd does with the
units; a test that needs a shorter timer says so in a drop-in, the way an
operator would.

Marked ``systemd``: ``pytest -m "not systemd"`` skips it. Without root,
systemd-nspawn or debootstrap it skips, unless ``ECHOD_REQUIRE_NSPAWN=1``
(set by ``.ci/run``), which makes that a failure. The first run
debootstraps the rootfs (one to two minutes); later runs reuse the cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.process import nspawn
from tests.process.nspawn import Machine, finish, readline
from tests.tlskit import TLSKit

REPO_ROOT = Path(__file__).resolve().parents[2]
PORT = "7878"  # echod's default and echod.socket's ListenStream=
UNITS = "/etc/systemd/system/echod.service /etc/systemd/system/echod.socket"
DEFAULT_FILE = "/etc/default/echod"
CONFIG_FILE = "/etc/echod/echod.toml"
CTL = "echod ctl --control-socket /run/echod/control.sock"
DROPIN = "/etc/systemd/system/echod.service.d/test.conf"
MAX_EXPOSURE = 2.0
WAIT = 30.0  # for systemd or the journal to catch up; never slept, only polled

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(300)]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    try:
        nspawn.check_available()
    except nspawn.Unavailable as why:
        if os.environ.get("ECHOD_REQUIRE_NSPAWN") == "1":
            pytest.fail(f"ECHOD_REQUIRE_NSPAWN=1 but {why}")
        pytest.skip(str(why))
    work = tmp_path_factory.mktemp("nspawn")
    lower = nspawn.rootfs(work / "debootstrap.log")
    wheels = nspawn.build_wheels(REPO_ROOT, work)
    with nspawn.booted(lower, work / "machine") as m:
        _install(m, wheels)
        yield m


def _install(m: Machine, wheels: Path) -> None:
    """docs/deploy.md, "Installing, step by step", steps 1, 2 and 4."""
    checkout = m.root / "root" / "echod"
    shutil.copytree(wheels, checkout / "wheels")
    shutil.copytree(REPO_ROOT / "systemd", checkout / "systemd")
    m.sh("python3 -m venv /opt/echod")
    m.sh("/opt/echod/bin/pip install -q --no-index --find-links /root/echod/wheels echod-server")
    m.sh("ln -s /opt/echod/bin/echod /usr/local/bin/echod")
    m.sh(
        "cd /root/echod"
        " && install -m 0644 systemd/echod.service systemd/echod.socket /etc/systemd/system/"
        f" && install -D -m 0644 systemd/echod.toml {CONFIG_FILE}"
        f" && install -m 0644 systemd/echod.default {DEFAULT_FILE}"
    )
    m.run("systemctl", "daemon-reload")
    verify = m.sh(f"systemd-analyze verify --man=no {UNITS}")
    assert verify.stdout + verify.stderr == "", verify.stdout + verify.stderr


@pytest.fixture
def echod(machine: Machine) -> Machine:
    """The machine with echod installed and stopped, as after installing."""
    m = machine
    m.run("systemctl", "stop", "echod.socket", "echod.service")
    m.run("systemctl", "reset-failed", "echod.service", "echod.socket", check=False)
    m.sh(
        f"rm -rf {os.path.dirname(DROPIN)}"
        f" && install -m 0644 /root/echod/systemd/echod.default {DEFAULT_FILE}"
        f" && install -m 0644 /root/echod/systemd/echod.toml {CONFIG_FILE}"
    )
    m.run("systemctl", "daemon-reload")
    return m


# ------------------------------------------------------------------ helpers


def _opts(m: Machine, opts: str) -> None:
    """ECHOD_OPTS in /etc/default/echod, as docs/deploy.md configures echod."""
    m.write(DEFAULT_FILE, f'ECHOD_OPTS="{opts}"\n')


def _dropin(m: Machine, text: str) -> None:
    m.write(DROPIN, f"[Service]\n{text}\n")
    m.run("systemctl", "daemon-reload")


def _wait(what: str, probe: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s (last: {value!r})"
        time.sleep(0.1)


def _service(m: Machine) -> dict[str, str]:
    return m.show(
        "echod.service",
        "ActiveState",
        "SubState",
        "Result",
        "MainPID",
        "NRestarts",
        "ExecMainStatus",
        "StatusText",
        "WatchdogTimestampMonotonic",
        "InvocationID",
    )


def _running(m: Machine, other_than: str = "0") -> dict[str, str] | None:
    state = _service(m)
    if state["ActiveState"] == "active" and state["MainPID"] not in ("0", other_than):
        return state
    return None


def _echod_lines(m: Machine, *args: str) -> list[dict[str, Any]]:
    """The journal lines of the current (or last) echod process, oldest first.

    Matched by the invocation ID systemd gives each run of the unit: a cursor
    would not do, as journald keeps the dynamic user's lines in a journal
    file of their own, and reading after a cursor across files skips some.
    """
    invocation = m.show("echod.service", "InvocationID")["InvocationID"]
    assert invocation, "echod.service has not run"
    return m.journal(f"_SYSTEMD_INVOCATION_ID={invocation}", *args)


def _event_entry(entries: list[dict[str, Any]], event: str) -> dict[str, Any] | None:
    for entry in entries:
        if f'"event": "{event}"' in entry["MESSAGE"] or f"{event} " in entry["MESSAGE"]:
            return entry
    return None


def _hold(m: Machine) -> subprocess.Popen[bytes]:
    """A client that has had one echo and stays connected until the server closes."""
    client = m.client("hold", PORT)
    assert readline(client) == "echoed\n"
    return client


# ------------------------------------------------------------------ tests


def test_start_returns_once_a_client_is_served(echod: Machine) -> None:
    m = echod
    m.run("systemctl", "start", "echod.service")
    # No retry, no wait: when systemctl start returns, echod must be serving.
    assert m.client_run("echo", PORT) == "ok\n"
    state = _service(m)
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    # The docs' own check (docs/deploy.md, step 6).
    assert m.sh(f"printf 'hello\\n' | nc -q1 127.0.0.1 {PORT}").stdout == "hello\n"


def test_status_shows_the_status_text(echod: Machine) -> None:
    """STATUS= is sent at start and when the client count changes (docs/deploy.md)."""
    m = echod
    m.run("systemctl", "start", "echod.service")

    def status_shows(text: str) -> bool:
        return f'Status: "{text}"' in m.run("systemctl", "status", "--no-pager", "echod").stdout

    client = _hold(m)
    try:
        _wait("Status: 1 clients", lambda: status_shows("1 clients"))
    finally:
        client.kill()
        client.wait(timeout=WAIT)
    _wait("Status: 0 clients", lambda: status_shows("0 clients"))


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_journal_has_echods_lines_at_their_priorities(echod: Machine, fmt: str) -> None:
    """--max-clients 5000 does not fit LimitNOFILE=4096: a warning at start."""
    m = echod
    _opts(m, f"--log-format {fmt} --max-clients 5000")
    m.run("systemctl", "start", "echod.service")

    def both() -> tuple[dict[str, Any], dict[str, Any]] | None:
        entries = _echod_lines(m)
        info, warning = (
            _event_entry(entries, "listening"),
            _event_entry(entries, "nofile_limit_low"),
        )
        return (info, warning) if info and warning else None

    info, warning = _wait("listening and nofile_limit_low in the journal", both)
    assert (info["PRIORITY"], warning["PRIORITY"]) == ("6", "4")
    for entry in _echod_lines(m):
        assert not entry["MESSAGE"].startswith("<"), entry  # journald took the prefix off
    warnings = _echod_lines(m, "-p", "warning")
    assert _event_entry(warnings, "nofile_limit_low") is not None
    assert _event_entry(warnings, "listening") is None


def test_stop_is_graceful(echod: Machine) -> None:
    m = echod
    m.run("systemctl", "start", "echod.service")
    client = _hold(m)
    m.run("systemctl", "stop", "echod.service")
    assert finish(client) == "Server shutting down\nEOF\n"
    state = _service(m)
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == (
        "inactive",
        "success",
        "0",
    ), state


def _stats(m: Machine) -> dict[str, str]:
    out = m.sh(f"{CTL} stats").stdout
    return dict(line.split("=", 1) for line in out.splitlines()[1:])


def test_reload_applies_a_changed_config_and_refuses_a_broken_one(echod: Machine) -> None:
    m = echod
    m.run("systemctl", "start", "echod.service")
    pid = _service(m)["MainPID"]
    m.sh(f"echo 'max_clients = 1' >> {CONFIG_FILE}")
    m.run("systemctl", "reload", "echod.service")
    assert _stats(m)["max_clients"] == "1"
    held = _hold(m)
    try:
        # The one slot is taken: the next client is refused, the held one stays.
        refused = m.sh(f"printf 'x\\n' | nc -q1 127.0.0.1 {PORT}").stdout
        assert refused == "ERR server full (max 1 clients)\n"
        m.sh(f"echo 'max_clients = 0' > {CONFIG_FILE}")
        failed = m.run("systemctl", "reload", "echod.service", check=False)
        assert failed.returncode != 0
        assert _stats(m)["max_clients"] == "1"  # nothing changed
        entry = _wait(
            "config_reload_failed in the journal",
            lambda: _event_entry(_echod_lines(m), "config_reload_failed"),
        )
        assert entry["PRIORITY"] == "3"
        assert "key max_clients: 0 is out of range" in entry["MESSAGE"]
        assert _service(m)["MainPID"] == pid  # reloaded in place, never restarted
    finally:
        held.kill()
        held.wait(timeout=WAIT)


def test_metrics_endpoint_answers(echod: Machine) -> None:
    m = echod
    m.sh(f"echo 'metrics_listen = \"127.0.0.1:9100\"' >> {CONFIG_FILE}")
    m.run("systemctl", "start", "echod.service")
    assert m.client_run("echo", PORT) == "ok\n"
    fetch = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9100/metrics').read().decode())"
    text = m.run("/opt/echod/bin/python", "-c", fetch).stdout
    assert re.search(r"^echod_connections_accepted_total 1\.0$", text, re.M), text
    # The sandbox (ProcSubset=pid, ProtectProc=invisible) still lets the library read /proc/self.
    assert re.search(r"^process_cpu_seconds_total [0-9.e+-]+$", text, re.M), text


def test_kill_9_is_restarted(echod: Machine) -> None:
    m = echod
    m.run("systemctl", "start", "echod.service")
    before = _service(m)
    m.sh(f"kill -9 {before['MainPID']}")
    after = _wait("a restarted echod", lambda: _running(m, other_than=before["MainPID"]))
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
    assert m.client_run("echo", PORT) == "ok\n"


def test_bad_flags_end_failed_without_restarts(echod: Machine) -> None:
    m = echod
    _opts(m, "--no-such-flag")
    assert m.run("systemctl", "start", "echod.service", check=False).returncode != 0
    state = _service(m)
    assert (state["ActiveState"], state["Result"], state["ExecMainStatus"]) == (
        "failed",
        "exit-code",
        "2",
    ), state
    assert state["NRestarts"] == "0", state
    sentence = _wait(
        "echod's sentence in the journal",
        lambda: [e for e in _echod_lines(m) if "no-such-flag" in e["MESSAGE"]],
    )
    assert sentence[0]["MESSAGE"].startswith("echod: "), sentence
    assert sentence[0]["PRIORITY"] == "3", sentence  # an error, not info


def test_a_start_that_keeps_failing_ends_failed(echod: Machine) -> None:
    """Port in use (exit 1) is restarted, until the start limit says failed."""
    m = echod
    squatter = m.client("listen", PORT)
    try:
        assert readline(squatter) == "listening\n"
        assert m.run("systemctl", "start", "echod.service", check=False).returncode != 0
        state = _wait(
            "the unit to end failed",
            lambda: (s := _service(m))["ActiveState"] == "failed" and s,
            timeout=90.0,  # 5 starts, 2 s apart
        )
        # It stays failed: no restart comes after RestartSec=2s.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert _service(m) == state
            time.sleep(0.2)
        assert int(state["NRestarts"]) >= 4, state  # it was restarted, not failed at once
    finally:
        finish(squatter)


def _listen_backlog(m: Machine) -> int:
    """The kernel's backlog of the listening socket on PORT (ss: Send-Q)."""
    out = subprocess.run(
        ["nsenter", f"--net=/proc/{m.pid1}/ns/net", "--", "ss", "-Hltn", f"sport = :{PORT}"],
        capture_output=True,
        text=True,
        timeout=nspawn.COMMAND_TIMEOUT,
        check=True,
    ).stdout.split()
    return int(out[2])


def test_socket_activation_and_a_restart_refuses_nobody(echod: Machine) -> None:
    m = echod
    _opts(m, "--backlog 128")
    m.run("systemctl", "start", "echod.socket")
    assert _service(m)["ActiveState"] == "inactive"
    assert _listen_backlog(m) == 4096  # echod.socket's Backlog=
    assert m.client_run("echo", PORT) == "ok\n"  # starts echod
    first = _wait("echod started by its socket", lambda: _running(m))
    listening = _wait("the listening event", lambda: _event_entry(_echod_lines(m), "listening"))
    assert json.loads(listening["MESSAGE"])["socket_activated"] is True
    # echod applies its own --backlog to the inherited socket, and says so.
    assert _listen_backlog(m) == 128
    assert "backlog=128" in m.run("echod", "ctl", "stats").stdout

    storm = m.client("storm", PORT)
    try:
        assert readline(storm) == "started\n"
        m.run("systemctl", "restart", "echod.service")
        second = _wait("a new echod", lambda: _running(m, other_than=first["MainPID"]))
        assert m.client_run("echo", PORT) == "ok\n"
        result = json.loads(finish(storm))  # closing its stdin ends it
    finally:
        if storm.poll() is None:
            storm.kill()
            storm.wait(timeout=WAIT)
    assert result["failures"] == [], result
    assert result["connections"] > 1, result
    assert second["MainPID"] != first["MainPID"]


def test_watchdog_restarts_a_stopped_echod(echod: Machine) -> None:
    m = echod
    # WatchdogSec=30s in the unit; 4 s (the least its comment allows) keeps this short.
    _dropin(m, "WatchdogSec=4s")
    m.run("systemctl", "start", "echod.service")
    first = _service(m)
    assert first["WatchdogTimestampMonotonic"] != "0", first  # READY=1 arms it

    # WATCHDOG=1 keeps coming (every 2 s) from an echod that is fine:
    # three pings span more than WatchdogSec, and it was not killed meanwhile.
    seen = {first["WatchdogTimestampMonotonic"]}

    def pinged_thrice() -> bool:
        seen.add(_service(m)["WatchdogTimestampMonotonic"])
        return len(seen) > 3

    _wait("three watchdog pings", pinged_thrice)
    assert _service(m)["MainPID"] == first["MainPID"]

    m.sh(f"kill -STOP {first['MainPID']}")
    second = _wait("echod restarted by the watchdog", lambda: _running(m, first["MainPID"]))
    assert int(second["NRestarts"]) == int(first["NRestarts"]) + 1
    systemd_says = m.journal(f"INVOCATION_ID={first['InvocationID']}", "-t", "systemd")
    assert any("Watchdog timeout" in e["MESSAGE"] for e in systemd_says), systemd_says
    assert m.client_run("echo", PORT) == "ok\n"


def test_security_exposure(echod: Machine) -> None:
    out = echod.run("systemd-analyze", "security", "--no-pager", "echod.service").stdout
    match = re.search(r"Overall exposure level for echod\.service:\s*([0-9.]+)", out)
    assert match, out
    assert float(match.group(1)) <= MAX_EXPOSURE, out


def test_upgrade_keeps_the_client_and_systemd_follows_the_new_pid(echod: Machine) -> None:
    """docs/deploy.md, "Upgrading": echod ctl upgrade under the shipped unit."""
    m = echod
    m.run("systemctl", "start", "echod.service")
    before = _service(m)
    client = _hold(m)
    done = m.run("echod", "ctl", "--control-socket", "/run/echod/control.sock", "upgrade")
    match = re.fullmatch(r"OK upgraded pid (\d+) -> (\d+)\n", done.stdout)
    assert match, done.stdout + done.stderr
    old, new = match.groups()
    assert old == before["MainPID"]
    after = _wait("systemd to follow", lambda: _running(m, other_than=old))
    assert after["MainPID"] == new, after
    assert after["NRestarts"] == before["NRestarts"]  # handed over, not restarted
    assert m.client_run("echo", PORT) == "ok\n"
    _wait("the old echod to exit", lambda: m.sh(f"kill -0 {old}", check=False).returncode)
    # The new main process feeds the watchdog (WatchdogSec=30s: a ping every 15 s).
    pinged = after["WatchdogTimestampMonotonic"]
    _wait(
        "a watchdog ping from the new echod",
        lambda: _service(m)["WatchdogTimestampMonotonic"] != pinged,
    )
    assert _service(m)["MainPID"] == new
    m.run("systemctl", "stop", "echod.service")
    # The client connected before the upgrade was never cut: the new echod ends it.
    assert finish(client) == "Server shutting down\nEOF\n"
    state = _service(m)
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success"), state


def test_tls_with_load_credential(echod: Machine, tmp_path: Path) -> None:
    """docs/deploy.md, "TLS": root-only key and certificate, the shipped drop-in.

    The dynamic user cannot read /etc/echod/tls; LoadCredential= copies the
    files into its credentials directory, where echod reads them.
    """
    m = echod
    kit = TLSKit(tmp_path)
    m.sh("install -d -m 0700 /etc/echod/tls")
    m.write("/etc/echod/tls/cert.pem", kit.cert.read_text())
    m.write("/etc/echod/tls/key.pem", kit.key.read_text())
    m.sh(
        "chmod 0600 /etc/echod/tls/cert.pem /etc/echod/tls/key.pem"
        " && install -D -m 0644 /root/echod/systemd/echod-tls.conf"
        f" {os.path.dirname(DROPIN)}/tls.conf"
    )
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "start", "echod.service")
    client = subprocess.run(
        [
            "nsenter",
            f"--net=/proc/{m.pid1}/ns/net",
            "--",
            "openssl",
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-CAfile",
            str(kit.ca_file),
            "-connect",
            f"127.0.0.1:{PORT}",
        ],
        input=b"over tls\nexit\n",
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert client.stdout == b"over tls\nbye\n", client.stderr.decode(errors="replace")
    _wait("tls_loaded in the journal", lambda: _event_entry(_echod_lines(m), "tls_loaded"))
    # The dynamic user itself cannot read the originals: the credentials are what it used.
    denied = m.sh(
        "setpriv --reuid=65534 --regid=65534 --clear-groups cat /etc/echod/tls/key.pem", check=False
    )
    assert denied.returncode != 0
