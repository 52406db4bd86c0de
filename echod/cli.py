"""The ``echod`` command: argument parsing, subcommands and exit codes.

This is the only module that turns exceptions into messages: every fatal
error reaches the user as one sentence on stderr (``echod: ...``) and a
non-zero exit status, never as a traceback.

Exit statuses: 0 success; 1 a runtime failure (port in use, no daemon
answering, an ``ERR`` answer); 2 bad usage; 3 ``status``: not running (LSB).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from echod import __version__, ctl, daemonize, logs, pidfile, privileges
from echod.config import add_arguments, settings_from_namespace
from echod.errors import EchodError, UsageError
from echod.service import Service

DESCRIPTION = "A TCP line-echo daemon with an operator console."
EPILOG = """\
subcommands:
  echod ctl COMMAND [ARGS]   send one operator command to a running echod
  echod console              interactive operator session on the control socket
  echod stop                 stop a detached echod (by its pidfile) and wait
  echod status               is a detached echod running? (LSB exit codes)

Run 'echod SUBCOMMAND --help' for a subcommand's options.
"""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr, not usage plus error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> Parser:
    parser = Parser(
        prog="echod",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"echod {__version__}")
    add_arguments(parser)
    return parser


def serve(argv: Sequence[str]) -> int:
    settings = settings_from_namespace(build_parser().parse_args(argv))
    if not settings.foreground:
        return daemonize.run_detached(settings)
    account = privileges.resolve_account(settings.user, settings.group)  # before binding
    logs.configure(settings.log_level, settings.log_format)
    service = Service(settings)
    if account is not None:
        privileges.drop_privileges(account)  # bound as root; serve as --user/--group
    return service.run()


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "ctl": ctl.ctl_main,
    "console": ctl.console_main,
    "stop": pidfile.stop_main,
    "status": pidfile.status_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            if args and args[0] in SUBCOMMANDS:
                return SUBCOMMANDS[args[0]](args[1:])
            return serve(args)
        finally:
            sys.stdout.flush()  # a closed pipe fails here, inside the handlers below
    except EchodError as err:
        # Under systemd the sentence reaches the journal as an error (journalctl -p err).
        print(f"{logs.journal_prefix(logs.ERROR_PRIORITY)}echod: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output left early (echod ctl list | head -1): no
        # traceback, and no second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
