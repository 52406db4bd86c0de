"""Who echod runs as: the ``--user``/``--group`` account, and becoming it.

Both modes use it the same way: :func:`resolve_account` before anything is
bound (a bad name is a usage error, and so is either flag when not root),
then, once the sockets are bound, :func:`drop_privileges`: hand the files
that must stay writable to the account (the log file, which SIGHUP
reopens), set the supplementary groups, then the gid, then the uid, real,
effective and saved, for good, and check that root cannot be regained.

Error handling: :class:`~echod.errors.UsageError` for what the flags alone
decide, :class:`~echod.errors.StartupError` for a switch that fails.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from echod.errors import StartupError, UsageError


@dataclass(frozen=True)
class Account:
    """Who to become after binding: ``uid`` None keeps the user (``--group`` only)."""

    user: str | None
    uid: int | None
    gid: int


def resolve_account(user: str | None, group: str | None) -> Account | None:
    """Look up ``--user``/``--group`` before anything is bound; None if neither is given."""
    if user is None and group is None:
        return None
    if os.geteuid() != 0:
        raise UsageError(
            "--user and --group need echod to be started as root "
            "(it binds, then switches to that user)"
        )
    name: str | None = None
    uid: int | None = None
    gid: int | None = None
    if user is not None:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise UsageError(f"--user: no such user {user!r}") from None
        name, uid, gid = pw.pw_name, pw.pw_uid, pw.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except KeyError:
            raise UsageError(f"--group: no such group {group!r}") from None
    assert gid is not None
    return Account(name, uid, gid)


def drop_privileges(account: Account, chown: Iterable[Path] = ()) -> None:
    """Give ``chown`` files to the account, then become it for good.

    The uid is set last (after it, nothing else may change), real, effective
    and saved alike, and regaining root is checked to fail.
    """
    who = account.user or f"group {account.gid}"
    for path in chown:
        try:
            os.chown(path, -1 if account.uid is None else account.uid, account.gid)
        except OSError as err:
            raise StartupError(f"cannot give {path} to {who}: {err.strerror}") from None
    try:
        if account.user is not None:
            os.initgroups(account.user, account.gid)
        else:
            os.setgroups([])  # root's supplementary groups must not stay
        os.setresgid(account.gid, account.gid, account.gid)
        if account.uid is not None:
            os.setresuid(account.uid, account.uid, account.uid)
    except OSError as err:
        raise StartupError(f"cannot switch to {who}: {err.strerror}") from None
    if account.uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise StartupError(f"switched to {who}, but root privileges could be regained")
