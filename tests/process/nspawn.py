"""A Debian 12 machine booted with systemd as PID 1 under systemd-nspawn, for tests.

What it takes (tests/process/test_systemd_real.py skips without it, unless
``ECHOD_REQUIRE_NSPAWN=1``, which ``.ci/run`` sets): root, ``systemd-nspawn``
(Debian: systemd-container), ``debootstrap``, ``nsenter`` and a cgroup2
mount.

The root file system
    ``debootstrap --variant=minbase`` of Debian 12 with systemd and Python,
    from the Debian mirror the machine's apt sources name (else
    deb.debian.org). It is cached in ``$ECHOD_TEST_ROOTFS_CACHE`` (default
    /var/cache/echod-test-rootfs) under a name that changes with the package
    list, built under a lock and renamed into place only when complete, so
    a crashed or concurrent build never leaves a half rootfs behind. The
    cached tree is never booted itself: each boot gets an overlayfs whose
    upper layer is a tmpfs of its own, thrown away afterwards, so every run
    starts from the same pristine system, and two runs can share the cache.

Booting
    The recipe that works on a host that does not run systemd itself
    (containers, CI runners): ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1
    systemd-nspawn --register=no --keep-unit --private-network
    --system-call-filter=bpf -b``. Without a host systemd there is no
    machined to register with and no unit to create, hence ``--register=no
    --keep-unit``; nspawn then makes ``payload`` and ``supervisor`` cgroups
    below its own cgroup and leaves them behind, so it is started in a
    cgroup of its own (made here, removed with them afterwards), which also
    keeps concurrent boots apart. ``--system-call-filter=bpf`` lets the
    payload's systemd install the cgroup BPF programs ``IPAddressDeny=``
    needs (without it the filter is silently not enforced).
    ``--private-network`` gives the machine its own loopback, so its echod
    on 127.0.0.1:7878 meets nothing on the host. On a host whose PID 1 is
    systemd, nspawn is run without those two flags and registers normally
    (not tried here).

Talking to it
    :meth:`Machine.run` enters every namespace of the machine's PID 1 with
    ``nsenter -a`` and a clean environment. Network clients are this
    checkout's Python (``tests/process/netclient.py``) entered only into the
    machine's network namespace, so they need nothing installed inside.

Error handling: every command has a timeout; a boot that does not reach
``systemctl is-system-running`` in :data:`BOOT_TIMEOUT` fails with the
console's last lines. :meth:`Machine.close` ends nspawn (SIGTERM, then
SIGKILL to the machine's PID 1, which ends its whole PID namespace),
unmounts and removes the cgroups, whatever state the boot reached.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SUITE = "bookworm"  # Debian 12
# python3-venv: docs/deploy.md installs echod into a venv; netcat-openbsd: the
# docs' own check (nc -q1). Everything else comes from PyPI wheels, offline.
PACKAGES = ("systemd", "systemd-sysv", "python3", "python3-venv", "netcat-openbsd")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
CACHE = Path(os.environ.get("ECHOD_TEST_ROOTFS_CACHE", "/var/cache/echod-test-rootfs"))
DEBOOTSTRAP_TIMEOUT = 900.0  # about two minutes on a busy 2-core machine
BOOT_TIMEOUT = 60.0  # the boot takes about a second; is-system-running --wait included
COMMAND_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 20.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETCLIENT = Path(__file__).with_name("netclient.py")


class Unavailable(Exception):
    """This host cannot boot the machine (not root, a tool missing, ...)."""


# ------------------------------------------------------------------ rootfs


def apt_mirror(sources: Sequence[Path] = ()) -> str:
    """The host's Debian mirror for :data:`SUITE`, from its apt sources.

    Reads one-line ``.list`` files (``deb [opts] URI SUITE COMPONENTS``) and
    deb822 ``.sources`` files; the first ``deb`` entry whose suites include
    :data:`SUITE` itself (not ``-security``/``-updates``) wins.
    """
    if not sources:
        apt = Path("/etc/apt")
        sources = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
                if (
                    "deb" in fields.get("types", [])
                    and SUITE in fields.get("suites", [])
                    and fields.get("enabled", ["yes"]) != ["no"]
                    and fields.get("uris")
                ):
                    return fields["uris"][0].rstrip("/")
        elif path.suffix == ".list" or path.name == "sources.list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1].rstrip("/")
    return DEFAULT_MIRROR


def rootfs(log: Path) -> Path:
    """The cached Debian 12 rootfs, debootstrapped first if need be."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(PACKAGES)}".encode()).hexdigest()[:12]
    target = CACHE / f"{SUITE}-{key}"
    done = target / ".echod-test-complete"
    if done.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it right now
        if done.exists():
            return target
        for stale in CACHE.iterdir():  # earlier package lists, aborted builds
            if stale.is_dir() and stale != target:
                shutil.rmtree(stale, ignore_errors=True)
        building = CACHE / f".{target.name}.building"
        shutil.rmtree(building, ignore_errors=True)
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(building),
            apt_mirror(),
        ]
        with open(log, "w") as out:
            proc = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT, check=False
            )
        if proc.returncode != 0:
            tail = log.read_text()[-2000:]
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{tail}")
        (building / done.name).touch()
        os.rename(building, target)
    return target


# ------------------------------------------------------------------ cgroups


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    return None


def _own_cgroup2() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _remove_cgroup(path: Path) -> None:
    """rmdir a cgroup and everything below it, deepest first (they must be empty)."""
    if not path.is_dir():
        return
    for sub, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):
            os.rmdir(sub)


def host_runs_systemd() -> bool:
    try:
        return Path("/proc/1/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def check_available() -> None:
    """Raise :class:`Unavailable` saying why this host cannot boot the machine."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (systemd-nspawn, debootstrap, overlayfs)")
    for tool, package in (
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
    ):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (Debian: apt-get install {package})")
    if _cgroup2_mount() is None:
        raise Unavailable("no cgroup2 file system is mounted")


# ------------------------------------------------------------------ machine


class Machine:
    """A booted machine; see the module docstring."""

    def __init__(self, lower: Path, workdir: Path) -> None:
        self.name = f"echod-test-{os.getpid()}"
        self.workdir = workdir
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self._mounts: list[Path] = []  # unmounted in reverse order
        self._cgroup: Path | None = None
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        # The writable layer on a tmpfs of its own: overlayfs refuses an upper
        # directory on overlayfs, which the temporary directory may be (docker).
        layer = workdir / "layer"
        for d in (self.root, layer):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._mount(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"], layer)
            (layer / "upper").mkdir()
            (layer / "work").mkdir()
            options = f"lowerdir={lower},upperdir={layer / 'upper'},workdir={layer / 'work'}"
            self._mount(["-t", "overlay", "-o", options, "overlay"], self.root)
        except BaseException:
            self.close()
            raise

    def _mount(self, args: list[str], target: Path) -> None:
        proc = subprocess.run(
            ["mount", *args, str(target)],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
        assert proc.returncode == 0, f"mount {' '.join(args)} {target}: {proc.stderr.strip()}"
        self._mounts.append(target)

    # -- boot and shut down ------------------------------------------------

    def boot(self) -> None:
        argv = ["systemd-nspawn", "-q", "-D", str(self.root), "-M", self.name]
        env = dict(os.environ)
        preexec = None
        if not host_runs_systemd():
            argv += ["--register=no", "--keep-unit"]
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
            mount = _cgroup2_mount()
            assert mount is not None
            self._cgroup = mount / _own_cgroup2().lstrip("/") / self.name
            self._cgroup.mkdir()
            procs = str(self._cgroup / "cgroup.procs")

            def preexec() -> None:  # in the child, before exec: nspawn starts in its cgroup
                with open(procs, "w") as f:
                    f.write("0")

        argv += ["--private-network", "--system-call-filter=bpf", "-b", "--console=read-only"]
        with open(self.console, "wb") as out:
            self._nspawn = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=preexec,
            )
        self.pid1 = self._wait_for_pid1()
        # systemctl fails until PID 1 has its private socket up: ask again.
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
            # "degraded": some unit of the minimal system failed; echod does not mind.
            if state.stdout.strip() in ("running", "degraded"):
                return
            assert left > 0, self._failure(f"is-system-running: {state.stdout}{state.stderr}")
            time.sleep(0.1)

    def _wait_for_pid1(self) -> int:
        assert self._nspawn is not None
        nspawn = self._nspawn.pid
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise AssertionError(self._failure(f"nspawn exited ({self._nspawn.returncode})"))
            try:
                children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
                for child in children:
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
            except OSError:
                pass  # between fork and exec, or just exited: look again
            time.sleep(0.05)
        raise AssertionError(self._failure(f"no systemd in the machine within {BOOT_TIMEOUT} s"))

    def _failure(self, what: str) -> str:
        try:
            console = self.console.read_text(errors="replace")[-3000:]
        except OSError:
            console = ""
        return f"{what}\n--- console of {self.name} ---\n{console}"

    def close(self) -> None:
        if self._nspawn is not None:
            if self._nspawn.poll() is None:
                self._nspawn.send_signal(signal.SIGTERM)  # nspawn asks PID 1 to power off
                try:
                    self._nspawn.wait(timeout=SHUTDOWN_TIMEOUT)
                except subprocess.TimeoutExpired:
                    if self.pid1:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(self.pid1, signal.SIGKILL)  # ends the PID namespace
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self._nspawn.wait(timeout=SHUTDOWN_TIMEOUT)
                    if self._nspawn.poll() is None:
                        self._nspawn.kill()
                        self._nspawn.wait(timeout=SHUTDOWN_TIMEOUT)
            self._nspawn = None
        while self._mounts:
            target = str(self._mounts.pop())
            umount = subprocess.run(
                ["umount", target], capture_output=True, timeout=COMMAND_TIMEOUT
            )
            if umount.returncode != 0:  # still busy: detach it, the kernel frees it later
                subprocess.run(["umount", "-l", target], timeout=COMMAND_TIMEOUT)
        if self._cgroup is not None:
            _remove_cgroup(self._cgroup)
            self._cgroup = None

    # -- commands inside -----------------------------------------------------

    def _env(self) -> dict[str, str]:
        return {
            "PATH": PATH,
            "LC_ALL": "C.UTF-8",
            "TERM": "dumb",
            "SYSTEMD_PAGER": "",
            "SYSTEMD_COLORS": "0",
        }

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the machine (all of PID 1's namespaces)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
            env=self._env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, check=check)

    def write(self, path: str, text: str) -> None:
        self.run("sh", "-ec", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path, input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, Any]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *args).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    # -- network clients -----------------------------------------------------

    def client(self, *args: str) -> subprocess.Popen[bytes]:
        """tests/process/netclient.py in the machine's network namespace.

        Unbuffered bytes pipes, so that :func:`readline` can wait with select
        and ``communicate`` later misses nothing.
        """
        return subprocess.Popen(
            [
                "nsenter",
                f"--net=/proc/{self.pid1}/ns/net",
                "--",
                sys.executable,
                str(NETCLIENT),
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            env=self._env(),
        )

    def client_run(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a netclient to its end; its stdout, or AssertionError with why."""
        return finish(self.client(*args), timeout)


def readline(proc: subprocess.Popen[bytes], timeout: float = COMMAND_TIMEOUT) -> str:
    """One line of a client's stdout, waiting at most ``timeout``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from {proc.args!r} within {timeout} s"
    return proc.stdout.readline().decode("utf-8", "replace")


def finish(proc: subprocess.Popen[bytes], timeout: float = COMMAND_TIMEOUT) -> str:
    """Close a client's stdin, wait for it; its remaining stdout if it succeeded."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=COMMAND_TIMEOUT)
    assert proc.returncode == 0, f"{proc.args!r}: {err.decode(errors='replace').strip()}"
    return out.decode("utf-8", "replace")


@contextlib.contextmanager
def booted(lower: Path, workdir: Path) -> Iterator[Machine]:
    machine = Machine(lower, workdir)
    try:
        machine.boot()
        yield machine
    finally:
        machine.close()


def build_wheels(repo: Path, workdir: Path) -> Path:
    """Wheels of this checkout and its dependencies, made on the host.

    Built from a copy: setuptools keeps ``build/`` in the source tree, and a
    stale one can put deleted modules into the wheel.
    """
    src = workdir / "src"
    shutil.copytree(
        repo,
        src,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            "out",
        ),
    )
    wheels = workdir / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(src)],
        timeout=DEBOOTSTRAP_TIMEOUT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}{proc.stderr}"
    return wheels
