"""The pidfile, what ``echod status`` reads from it, and ``--user``/``--group`` lookup.

Real files in tmp_path and real ``flock`` locks. ``flock`` locks belong to
an open file description, so a second open of the same path in this very
process conflicts with the first just as another process would: that is what
lets these tests play both the daemon and the starter. Processes whose pids
are needed (a dead one, a zombie, one that does not hold the file) are real
children.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from echod import daemonize
from echod.daemonize import DEAD, NOT_RUNNING, RUNNING, UNKNOWN, Pidfile, inspect
from echod.errors import StartupError, UsageError
from tests.conftest import TIMEOUT, wait_for


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Pidfile]:
    held = Pidfile(tmp_path / "run" / "echod.pid")
    yield held
    held.release()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait(TIMEOUT)
    return child.pid


# -- acquiring and releasing ---------------------------------------------------


def test_acquire_creates_the_directory_and_a_locked_pidfile(pidfile: Pidfile) -> None:
    pidfile.acquire()
    assert pidfile.path.is_file()
    assert oct(pidfile.path.stat().st_mode & 0o777) == oct(0o644)
    fd = os.open(pidfile.path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_written_pid_is_the_whole_content(pidfile: Pidfile) -> None:
    pidfile.path.parent.mkdir()
    pidfile.path.write_text("1234567890 leftover from before\n")
    pidfile.acquire()
    assert pidfile.path.read_text() == ""  # emptied at once: no stale pid is ever shown
    pidfile.write_pid(os.getpid())
    assert pidfile.path.read_text() == f"{os.getpid()}\n"


def test_second_acquire_is_refused_with_the_running_pid(pidfile: Pidfile) -> None:
    pidfile.acquire()
    pidfile.write_pid(os.getpid())
    with pytest.raises(StartupError, match=rf"^already running \(pid {os.getpid()}\)$"):
        Pidfile(pidfile.path).acquire()
    assert pidfile.path.read_text() == f"{os.getpid()}\n"  # the loser changed nothing


def test_second_acquire_before_the_pid_is_written_names_the_file(pidfile: Pidfile) -> None:
    pidfile.acquire()
    with pytest.raises(StartupError, match=r"^already running \(pidfile .* is locked\)$"):
        Pidfile(pidfile.path).acquire()


def test_stale_pidfile_is_taken_over(pidfile: Pidfile) -> None:
    pidfile.path.parent.mkdir()
    pidfile.path.write_text(f"{dead_pid()}\n")
    pidfile.acquire()
    pidfile.write_pid(os.getpid())
    assert inspect(pidfile.path).status == RUNNING


def test_release_removes_and_unlocks(pidfile: Pidfile) -> None:
    pidfile.acquire()
    assert pidfile.release() is True
    assert not pidfile.path.exists()
    assert pidfile.release() is False  # idempotent
    again = Pidfile(pidfile.path)
    again.acquire()
    again.release()


def test_release_never_removes_a_file_it_does_not_hold(pidfile: Pidfile) -> None:
    pidfile.acquire()
    pidfile.path.unlink()
    pidfile.path.write_text("4242\n")  # somebody else's pidfile now
    assert pidfile.release() is False
    assert pidfile.path.read_text() == "4242\n"


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "echod.pid"
    link.symlink_to(target)
    with pytest.raises(StartupError, match="symbolic link"):
        Pidfile(link).acquire()


def test_a_directory_in_the_way_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "echod.pid").mkdir()
    with pytest.raises(StartupError, match=r"^cannot open pidfile .*: Is a directory$"):
        Pidfile(tmp_path / "echod.pid").acquire()
    (tmp_path / "file").write_text("")
    with pytest.raises(StartupError, match=r"^cannot use pidfile directory .*not a directory$"):
        Pidfile(tmp_path / "file" / "echod.pid").acquire()


# -- inspect: what echod status and echod stop see -------------------------------


def test_inspect_missing_pidfile_is_not_running(tmp_path: Path) -> None:
    state = inspect(tmp_path / "none.pid")
    assert (state.status, state.pid) == (NOT_RUNNING, None)
    assert "not running" in state.message


def test_inspect_empty_unlocked_pidfile_is_not_running(tmp_path: Path) -> None:
    # What a daemon leaves when it may not remove its pidfile (dropped privileges).
    (tmp_path / "echod.pid").write_text("")
    assert inspect(tmp_path / "echod.pid").status == NOT_RUNNING


@pytest.mark.parametrize("content", ["{dead}\n", "garbage\n"])
def test_inspect_unlocked_pidfile_with_content_is_stale(tmp_path: Path, content: str) -> None:
    path = tmp_path / "echod.pid"
    path.write_text(content.format(dead=dead_pid()))
    state = inspect(path)
    assert state.status == DEAD
    assert "stale" in state.message


def test_inspect_locked_pidfile_held_by_its_pid_is_running(pidfile: Pidfile) -> None:
    pidfile.acquire()
    pidfile.write_pid(os.getpid())
    state = inspect(pidfile.path)
    assert (state.status, state.pid) == (RUNNING, os.getpid())
    assert pidfile.path.read_text() == f"{os.getpid()}\n"
    Pidfile(pidfile.path.with_name("x.pid")).acquire()  # inspect left no lock of its own


def test_inspect_locked_pidfile_naming_another_process_is_unknown(pidfile: Pidfile) -> None:
    # The lock is held (by us), but the pid written is a process that does not
    # have the file open: whoever signals it on this word would hit a stranger.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile.acquire()
        pidfile.write_pid(stranger.pid)
        state = inspect(pidfile.path)
        assert (state.status, state.pid) == (UNKNOWN, stranger.pid)
        assert "does not hold it" in state.message
    finally:
        stranger.kill()
        stranger.wait(TIMEOUT)


def test_inspect_locked_pidfile_without_pid_is_unknown(pidfile: Pidfile) -> None:
    pidfile.acquire()
    state = inspect(pidfile.path, grace=0.0)
    assert state.status == UNKNOWN
    assert "holds no pid" in state.message


def test_inspect_waits_briefly_for_a_starting_daemon_to_write_its_pid(pidfile: Pidfile) -> None:
    pidfile.acquire()
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import os, sys, time; time.sleep(0.2); "
                f"fd = os.open({str(pidfile.path)!r}, os.O_WRONLY); "
                f"os.write(fd, b'%d\\n' % {os.getpid()})"
            ),
        ]
    )
    try:
        state = inspect(pidfile.path, grace=TIMEOUT)
        assert (state.status, state.pid) == (RUNNING, os.getpid())
    finally:
        writer.wait(TIMEOUT)


def test_inspect_a_directory_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "echod.pid").mkdir()
    assert inspect(tmp_path / "echod.pid").status == UNKNOWN


def test_is_alive_treats_a_zombie_as_gone() -> None:
    # Some containers' init never reaps orphans: a daemon that exited stays a zombie.
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        wait_for(lambda: not daemonize.is_alive(child), what="the child to become a zombie")
        assert os.path.exists(f"/proc/{child}")  # still there, unreaped
    finally:
        os.waitpid(child, 0)
    assert daemonize.is_alive(os.getpid())


# -- --user / --group ------------------------------------------------------------


def test_no_user_no_group_is_no_switch() -> None:
    assert daemonize.resolve_account(None, None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_user_and_group_are_looked_up_by_name_or_number() -> None:
    nobody = daemonize.resolve_account("nobody", None)
    assert nobody == daemonize.Account("nobody", 65534, 65534)
    assert daemonize.resolve_account("65534", "0") == daemonize.Account("nobody", 65534, 0)
    assert daemonize.resolve_account(None, "nogroup") == daemonize.Account(None, None, 65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize(
    ("user", "group", "message"),
    [
        ("no-such-user-echod", None, "--user: no such user 'no-such-user-echod'"),
        (None, "no-such-group-echod", "--group: no such group 'no-such-group-echod'"),
    ],
)
def test_unknown_account_is_a_usage_error(
    user: str | None, group: str | None, message: str
) -> None:
    with pytest.raises(UsageError) as err:
        daemonize.resolve_account(user, group)
    assert str(err.value) == message
