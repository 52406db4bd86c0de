"""TLS with the real ``echod`` command and real clients: openssl s_client, ncat --ssl, socat.

Also the start-up errors (one sentence, exit status 1, before detaching) and
rotation by SIGHUP. Certificates come from trustme (tests/tlskit.py).
"""

from __future__ import annotations

import datetime
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme

from tests.helpers import ROOT, TIMEOUT, EchodProcess, ctl
from tests.tlskit import TLSClient, TLSKit, serial_of

Spawn = Callable[..., EchodProcess]


@pytest.fixture
def kit(tmp_path: Path) -> TLSKit:
    return TLSKit(tmp_path)


def tls_args(kit: TLSKit, *more: str) -> list[str]:
    return ["--tls-cert", str(kit.cert), "--tls-key", str(kit.key), *more]


def run_client(cmd: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    if shutil.which(cmd[0]) is None:
        pytest.fail(f"{cmd[0]} is not installed (.ci/run installs it)")
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=TIMEOUT, check=False)


# -- real clients -------------------------------------------------------------------


def test_openssl_s_client(spawn_echod: Spawn, kit: TLSKit) -> None:
    echod = spawn_echod(*tls_args(kit))
    proc = run_client(
        [
            "openssl",
            "s_client",
            "-quiet",
            "-connect",
            f"127.0.0.1:{echod.port}",
            "-CAfile",
            str(kit.ca_file),
            "-verify_return_error",
        ],
        b"hello over tls\nexit\n",
    )
    assert proc.stdout == b"hello over tls\nbye\n", proc.stderr


def test_ncat_ssl(spawn_echod: Spawn, kit: TLSKit) -> None:
    echod = spawn_echod(*tls_args(kit))
    proc = run_client(
        [
            "ncat",
            "--ssl",
            "--ssl-verify",
            "--ssl-trustfile",
            str(kit.ca_file),
            "--ssl-servername",  # ncat matches DNS names only, not the IP address
            "localhost",
            "127.0.0.1",
            str(echod.port),
        ],
        b"ncat says hi\nexit\n",
    )
    assert proc.stdout == b"ncat says hi\nbye\n", proc.stderr


def test_socat_partial_line_at_end_of_input(spawn_echod: Spawn, kit: TLSKit) -> None:
    """socat ends its input with close_notify: the trailing partial line is still echoed."""
    echod = spawn_echod(*tls_args(kit))
    proc = run_client(
        ["socat", "-t", "5", "-", f"OPENSSL:127.0.0.1:{echod.port},cafile={kit.ca_file}"],
        b"one\ntwo without newline",
    )
    assert proc.stdout == b"one\ntwo without newline", proc.stderr
    closed = echod.wait_event("connection_closed")
    assert closed["reason"] == "eof"


def test_s_client_with_client_certificates(spawn_echod: Spawn, kit: TLSKit) -> None:
    echod = spawn_echod(*tls_args(kit, "--tls-client-ca", str(kit.ca_file)))
    base = ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{echod.port}"]
    cert, key = kit.issue("bob", common_name="bob")
    good = run_client([*base, "-cert", str(cert), "-key", str(key)], b"bob here\nexit\n")
    assert good.stdout == b"bob here\nbye\n", good.stderr
    none = run_client(base, b"nobody\nexit\n")
    assert b"nobody" not in none.stdout
    other_cert, other_key = kit.issue("eve", ca=trustme.CA(), common_name="eve")
    other = run_client([*base, "-cert", str(other_cert), "-key", str(other_key)], b"eve\nexit\n")
    assert b"eve" not in other.stdout
    errors = []
    for _ in range(2):
        event = echod.wait_event("client_refused", where=lambda e: e.get("error") not in errors)
        errors.append(event["error"])
    assert sorted(errors) == ["CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"]


# -- start-up errors -------------------------------------------------------------------


def run_echod(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "echod", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )


def one_sentence(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


FOREGROUND = ("--foreground", "--port", "0", "--control-socket", "none")


def test_cert_without_key_is_a_usage_error(kit: TLSKit) -> None:
    proc = run_echod(*FOREGROUND, "--tls-cert", str(kit.cert))
    assert proc.returncode == 2
    assert "--tls-cert and --tls-key go together" in one_sentence(proc)


@pytest.mark.parametrize("detached", [False, True], ids=["foreground", "detached"])
def test_bad_files_fail_the_start(kit: TLSKit, tmp_path: Path, detached: bool) -> None:
    _, other_key = kit.issue("localhost")
    expired = kit.issue(
        "localhost",
        not_before=datetime.datetime(2020, 1, 1),
        not_after=datetime.datetime(2020, 2, 1),
    )
    mode: tuple[str, ...] = FOREGROUND
    if detached:  # the sentence must reach the terminal before detaching
        mode = (
            "--port",
            "0",
            "--control-socket",
            "none",
            "--pidfile",
            str(tmp_path / "echod.pid"),
            "--log-file",
            str(tmp_path / "echod.log"),
        )
    cases = {
        "no such file": ["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(kit.key)],
        "does not match the certificate": [
            "--tls-cert",
            str(kit.cert),
            "--tls-key",
            str(other_key),
        ],
        "expired on 2020-02-01": ["--tls-cert", str(expired[0]), "--tls-key", str(expired[1])],
    }
    for expected, args in cases.items():
        proc = run_echod(*mode, *args)
        assert proc.returncode == 1, proc.stderr
        sentence = one_sentence(proc)
        assert sentence.startswith("echod: ") and expected in sentence
        assert proc.stdout == ""  # never "echod listening on ..."


# -- rotation --------------------------------------------------------------------------


def test_sighup_rotation(spawn_echod: Spawn, kit: TLSKit) -> None:
    echod = spawn_echod(*tls_args(kit))
    loaded = echod.events[-2]
    assert loaded["event"] == "tls_loaded"
    assert int(loaded["serial"], 16) == serial_of(kit.cert)
    old = TLSClient(echod.port, context=kit.client_context())
    assert old.roundtrip(b"before\n") == b"before\n"
    first = old.peer_serial()

    new_cert, new_key = kit.issue("localhost", "127.0.0.1")
    kit.cert.write_bytes(new_cert.read_bytes())
    kit.key.write_bytes(new_key.read_bytes())
    echod.signal(signal.SIGHUP)
    reloaded = echod.wait_event("tls_reloaded")
    assert int(reloaded["serial"], 16) == serial_of(new_cert)
    new = TLSClient(echod.port, context=kit.client_context())
    assert new.peer_serial() == serial_of(new_cert) != first
    assert old.roundtrip(b"old keeps echoing\n") == b"old keeps echoing\n"

    # A broken certificate: the reload fails, and the second one keeps serving.
    kit.cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    echod.signal(signal.SIGHUP)
    failed = echod.wait_event("tls_reload_failed")
    assert "cannot be parsed" in failed["detail"] or "holds no" in failed["detail"]
    third = TLSClient(echod.port, context=kit.client_context())
    assert third.peer_serial() == serial_of(new_cert)
    assert third.roundtrip(b"still served\n") == b"still served\n"
    for client in (old, new, third):
        client.close()
    echod.signal(signal.SIGTERM)
    assert echod.wait() == 0


def test_config_reload_loads_new_tls_files(spawn_echod: Spawn, kit: TLSKit, tmp_path: Path) -> None:
    """With --config, SIGHUP reloads the file, and the TLS applier loads the files it names."""
    config = tmp_path / "echod.toml"
    config.write_text(f'tls_cert = "{kit.cert}"\ntls_key = "{kit.key}"\n')
    echod = spawn_echod("--config", str(config))
    old = TLSClient(echod.port, context=kit.client_context())
    assert old.roundtrip(b"before\n") == b"before\n"
    new_cert, new_key = kit.issue("localhost", "127.0.0.1")
    config.write_text(f'tls_cert = "{new_cert}"\ntls_key = "{new_key}"\n')  # new paths
    echod.signal(signal.SIGHUP)
    reloaded = echod.wait_event("config_reloaded")
    assert set(reloaded["changed"]) == {"tls_cert", "tls_key"}
    assert int(echod.wait_event("tls_reloaded")["serial"], 16) == serial_of(new_cert)
    assert TLSClient(echod.port, context=kit.client_context()).peer_serial() == serial_of(new_cert)
    assert old.roundtrip(b"old keeps echoing\n") == b"old keeps echoing\n"
    # A key that does not fit: the whole reload fails, the current certificate stays.
    _, stranger_key = kit.issue("localhost")
    config.write_text(f'tls_cert = "{new_cert}"\ntls_key = "{stranger_key}"\n')
    echod.signal(signal.SIGHUP)
    assert "does not match" in echod.wait_event("tls_reload_failed")["detail"]
    assert "does not match" in echod.wait_event("config_reload_failed")["detail"]
    third = TLSClient(echod.port, context=kit.client_context())
    assert third.peer_serial() == serial_of(new_cert)
    assert third.roundtrip(b"still served\n") == b"still served\n"
    for client in (old, third):
        client.close()


def test_upgrade_is_refused_with_tls_and_echod_serves_on(
    spawn_echod: Spawn, kit: TLSKit, ctl_dir: Path
) -> None:
    """A TLS session cannot move to another process: echod ctl upgrade says so, nothing changes."""
    control = ctl_dir / "control.sock"
    echod = spawn_echod(*tls_args(kit, "--control-socket", str(control)))
    client = TLSClient(echod.port, context=kit.client_context())
    assert client.roundtrip(b"before\n") == b"before\n"
    answer = ctl(control, "upgrade")
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "TLS sessions cannot move to another process" in answer.stdout + answer.stderr
    assert client.roundtrip(b"still here\n") == b"still here\n"
    assert echod.proc.poll() is None
    client.close()
