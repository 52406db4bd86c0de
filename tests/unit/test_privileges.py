"""``--user``/``--group``: looking the account up (:mod:`echod.privileges`).

Dropping privileges for real is exercised as root by tests/process/test_detached.py.
"""

from __future__ import annotations

import os

import pytest

from echod import privileges
from echod.errors import UsageError

# -- --user / --group ------------------------------------------------------------


def test_no_user_no_group_is_no_switch() -> None:
    assert privileges.resolve_account(None, None) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_user_and_group_are_looked_up_by_name_or_number() -> None:
    nobody = privileges.resolve_account("nobody", None)
    assert nobody == privileges.Account("nobody", 65534, 65534)
    assert privileges.resolve_account("65534", "0") == privileges.Account("nobody", 65534, 0)
    assert privileges.resolve_account(None, "nogroup") == privileges.Account(None, None, 65534)


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
        privileges.resolve_account(user, group)
    assert str(err.value) == message
