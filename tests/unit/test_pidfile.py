"""The pidfile and what ``echod status`` reads from it (:mod:`echod.pidfile`).

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

from echod import pidfile as pidfile_module
from echod.errors import StartupError, UsageError
from echod.pidfile import DEAD, NOT_RUNNING, RUNNING, UNKNOWN, Pidfile, read_state
from tests.helpers import TIMEOUT, wait_for


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
    assert read_state(pidfile.path).status == RUNNING


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


# -- read_state: what echod status and echod stop see -------------------------------


def test_read_state_missing_pidfile_is_not_running(tmp_path: Path) -> None:
    state = read_state(tmp_path / "none.pid")
    assert (state.status, state.pid) == (NOT_RUNNING, None)
    assert "not running" in state.message


def test_read_state_empty_unlocked_pidfile_is_not_running(tmp_path: Path) -> None:
    # What a daemon leaves when it may not remove its pidfile (dropped privileges).
    (tmp_path / "echod.pid").write_text("")
    assert read_state(tmp_path / "echod.pid").status == NOT_RUNNING


@pytest.mark.parametrize("content", ["{dead}\n", "garbage\n"])
def test_read_state_unlocked_pidfile_with_content_is_stale(tmp_path: Path, content: str) -> None:
    path = tmp_path / "echod.pid"
    path.write_text(content.format(dead=dead_pid()))
    state = read_state(path)
    assert state.status == DEAD
    assert "stale" in state.message


def test_read_state_locked_pidfile_held_by_its_pid_is_running(pidfile: Pidfile) -> None:
    pidfile.acquire()
    pidfile.write_pid(os.getpid())
    state = read_state(pidfile.path)
    assert (state.status, state.pid) == (RUNNING, os.getpid())
    assert pidfile.path.read_text() == f"{os.getpid()}\n"
    Pidfile(pidfile.path.with_name("x.pid")).acquire()  # read_state left no lock of its own


def test_read_state_locked_pidfile_naming_another_process_is_unknown(pidfile: Pidfile) -> None:
    # The lock is held (by us), but the pid written is a process that does not
    # have the file open: whoever signals it on this word would hit a stranger.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pidfile.acquire()
        pidfile.write_pid(stranger.pid)
        state = read_state(pidfile.path)
        assert (state.status, state.pid) == (UNKNOWN, stranger.pid)
        assert "does not hold it" in state.message
    finally:
        stranger.kill()
        stranger.wait(TIMEOUT)


def test_read_state_locked_pidfile_without_pid_is_unknown(pidfile: Pidfile) -> None:
    pidfile.acquire()
    state = read_state(pidfile.path, grace=0.0)
    assert state.status == UNKNOWN
    assert "holds no pid" in state.message


def test_read_state_waits_briefly_for_a_starting_daemon_to_write_its_pid(pidfile: Pidfile) -> None:
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
        state = read_state(pidfile.path, grace=TIMEOUT)
        assert (state.status, state.pid) == (RUNNING, os.getpid())
    finally:
        writer.wait(TIMEOUT)


def test_read_state_a_directory_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "echod.pid").mkdir()
    assert read_state(tmp_path / "echod.pid").status == UNKNOWN


def test_is_alive_treats_a_zombie_as_gone() -> None:
    # Some containers' init never reaps orphans: a daemon that exited stays a zombie.
    child = os.fork()
    if child == 0:
        os._exit(0)
    try:
        wait_for(lambda: not pidfile_module.is_alive(child), what="the child to become a zombie")
        assert os.path.exists(f"/proc/{child}")  # still there, unreaped
    finally:
        os.waitpid(child, 0)
    assert pidfile_module.is_alive(os.getpid())


# -- echod stop / echod status: their options ---------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--timeout", "0"], "argument --timeout: must be more than 0 seconds"),
        (["--timeout", "-1"], "argument --timeout: must be more than 0 seconds"),
        (["--timeout", "soon"], "argument --timeout: 'soon' is not a number of seconds"),
        (["--timeout", "1e10"], "argument --timeout: must be at most 86400 seconds (one day)"),
        (["--pidfile", ""], "argument --pidfile: the path must not be empty"),
    ],
)
def test_stop_options_get_the_daemons_sentences(argv: list[str], message: str) -> None:
    """The same parsers as the daemon's flags (echod.config), so the same words."""
    with pytest.raises(UsageError) as info:
        pidfile_module.stop_main(argv)
    assert str(info.value) == f"{message} (see 'echod stop --help')"
    assert info.value.exit_status == 2


def test_status_help_states_every_lsb_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pidfile_module.status_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for code, meaning in pidfile_module.STATUS_CODES.items():
        assert f"{code} {' '.join(meaning.split())}" in help_text
