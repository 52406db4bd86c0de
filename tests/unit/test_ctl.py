"""Unit tests for echod.ctl: the options of ``echod ctl`` and ``echod console``.

Their talk with a real daemon is in tests/process/test_control.py and
tests/process/test_consoles.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from echod import ctl
from echod.errors import UsageError


@pytest.mark.parametrize(("prog", "main"), [("ctl", ctl.ctl_main), ("console", ctl.console_main)])
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--timeout", "0"], "argument --timeout: must be more than 0 seconds"),
        (["--timeout", "-1"], "argument --timeout: must be more than 0 seconds"),
        (["--timeout", "soon"], "argument --timeout: 'soon' is not a number of seconds"),
        (["--timeout", "1e10"], "argument --timeout: must be at most 86400 seconds (one day)"),
        (["--control-socket", ""], "argument --control-socket: the path must not be empty"),
    ],
)
def test_options_get_the_daemons_sentences(
    prog: str, main: Callable[[Sequence[str]], int], argv: list[str], message: str
) -> None:
    """The same parsers as the daemon's flags (echod.config), so the same words."""
    with pytest.raises(UsageError) as info:
        main([*argv, "list"] if prog == "ctl" else argv)
    assert str(info.value) == f"{message} (see 'echod {prog} --help')"
    assert info.value.exit_status == 2
