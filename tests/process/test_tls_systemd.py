"""The TLS drop-in (systemd/echod-tls.conf), as docs/deploy.md installs it.

``systemd-analyze verify`` reads the unit with the drop-in next to it, as
systemd would from /etc/systemd/system/echod.service.d/, and prints the
command line it would run, ``%d`` expanded. That exact command is then run
the way ``LoadCredential=`` with ``DynamicUser=`` lays things out: the
credentials directory mode 0500 and the files 0400, owned by the
unprivileged user echod runs as (here ``nobody``, via setpriv), while the
originals stay root's. systemd itself copying the files, with systemd as
PID 1, is tests/process/test_systemd_real.py::test_tls_with_load_credential.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, TIMEOUT, EchodProcess
from tests.tlskit import TLSClient, TLSKit

SERVICE = ROOT / "systemd" / "echod.service"
DROP_IN = ROOT / "systemd" / "echod-tls.conf"
DEPLOY = ROOT / "docs" / "deploy.md"
UNIT_ECHOD = "/usr/local/bin/echod"
CREDENTIALS = "/run/credentials/echod.service"


def echod_binary() -> str:
    beside = Path(sys.executable).with_name("echod")
    return str(beside) if beside.exists() else shutil.which("echod") or UNIT_ECHOD


def test_docs_show_the_drop_in_as_shipped() -> None:
    settings = [
        line
        for line in DROP_IN.read_text().splitlines()
        if line and not line.startswith("#") and not line.startswith("[")
    ]
    docs = DEPLOY.read_text()
    for line in settings:
        assert line in docs, f"docs/deploy.md does not show {line!r}"


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """Under /tmp, searchable by everyone (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="echod-cred-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_drop_in_verifies_and_its_command_serves_tls(tmp_path: Path, private_dir: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (.ci/run installs systemd)")
    binary = echod_binary()
    units = tmp_path / "units"
    (units / "echod.service.d").mkdir(parents=True)
    service = units / "echod.service"
    service.write_text(SERVICE.read_text().replace(UNIT_ECHOD, binary))
    drop_in = units / "echod.service.d" / "tls.conf"
    drop_in.write_text(DROP_IN.read_text().replace(UNIT_ECHOD, binary))
    for unit in (service, drop_in):
        unit.chmod(0o644)
    proc = subprocess.run(
        [analyze, "verify", "--man=no", str(service)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug", "SYSTEMD_LOG_COLOR": "0"},
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert f"DropIn Path: {drop_in}" in output
    complaints = [line for line in output.splitlines() if "tls.conf:" in line]
    assert complaints == []
    # ExecStart= (the drop-in's) and ExecReload=: the one that starts echod with TLS.
    commands = [c for c in re.findall(r"Command Line: (.*)", output) if "--tls-cert" in c]
    assert len(commands) == 1, output[-3000:]
    # systemd expands $ECHOD_OPTS (unset here) to nothing; its dump shows it quoted.
    argv = [arg for arg in shlex.split(commands[0]) if not arg.endswith("$ECHOD_OPTS")]
    assert argv[0] == binary
    assert argv[argv.index("--tls-cert") + 1] == f"{CREDENTIALS}/tls-cert"
    assert argv[argv.index("--tls-key") + 1] == f"{CREDENTIALS}/tls-key"

    if os.geteuid() != 0:
        pytest.skip("laying out credentials for another user needs root")
    # The originals: root's alone, as the docs install them.
    kit = TLSKit(tmp_path)
    for path in (kit.cert, kit.key):
        path.chmod(0o600)
    # What systemd makes of LoadCredential= with DynamicUser=.
    creds = private_dir / "credentials"
    creds.mkdir()
    shutil.copy(kit.cert, creds / "tls-cert")
    shutil.copy(kit.key, creds / "tls-key")
    nobody = 65534
    for path in (creds / "tls-cert", creds / "tls-key"):
        os.chown(path, nobody, nobody)
        path.chmod(0o400)
    os.chown(creds, nobody, nobody)
    creds.chmod(0o500)
    argv = [arg.replace(CREDENTIALS, str(creds)) for arg in argv]
    argv[argv.index("--control-socket") + 1] = "none"  # /run/echod is RuntimeDirectory=
    if "--config" in argv:  # the unit's /etc/echod/echod.toml: an empty one here
        empty = private_dir / "echod.toml"
        empty.write_text("")
        empty.chmod(0o644)
        argv[argv.index("--config") + 1] = str(empty)
    setpriv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
    echod = EchodProcess([*argv[1:], "--port", "0"], program=[*setpriv, argv[0]])
    try:
        client = TLSClient(echod.port, context=kit.client_context())
        assert client.roundtrip(b"from the credentials\n") == b"from the credentials\n"
        client.close()
    finally:
        echod.stop()
