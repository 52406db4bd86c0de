"""The ``echod`` command: argument parsing, subcommands and exit codes.

This is the only module that turns exceptions into messages: every fatal
error reaches the user as one sentence on stderr (``echod: ...``) and a
non-zero exit status, never as a traceback; a config file with several
problems gets one such line per problem.

Exit statuses: 0 success; 1 a runtime failure (port in use, no daemon
answering, an ``ERR`` answer); 2 bad usage; 3 ``status``: not running (LSB).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from echod import __version__, ctl, daemonize, logs, pidfile, privileges, successor
from echod.config import Parser, add_arguments, given_values, parse_path
from echod.configfile import ConfigError, Source
from echod.errors import EchodError
from echod.service import Service
from echod.upgrade import Launch

DESCRIPTION = "A TCP line-echo daemon with an operator console."
EPILOG = """\
subcommands:
  echod ctl COMMAND [ARGS]   send one operator command to a running echod
  echod console              interactive operator session on the control socket
  echod stop                 stop a detached echod (by its pidfile) and wait
  echod status               is a detached echod running? (LSB exit codes)
  echod check-config         check --config PATH and the flags, start nothing

Run 'echod SUBCOMMAND --help' for a subcommand's options.
"""


def build_parser() -> Parser:
    parser = Parser(
        prog="echod",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"echod {__version__}")
    add_config_argument(parser)
    add_arguments(parser)
    return parser


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=parse_path,
        metavar="PATH",
        help="read settings from this TOML file (keys: the long flags with _ for -); "
        "flags given here win over it; SIGHUP and 'echod ctl reload' re-read it",
    )


def source_from_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Source:
    """The config file and the flags given (only those) of a command line."""
    ns = parser.parse_args(argv)
    return Source(ns.config, given_values(ns))


def serve(argv: Sequence[str]) -> int:
    source = source_from_args(build_parser(), argv)
    settings = source.load()
    launch = Launch.here(argv)  # how to start the same again, for an upgrade
    if successor.is_successor():  # started by an upgrade: take over, already detached
        return successor.successor_main(settings, source, launch)
    if not settings.foreground:
        return daemonize.run_detached(settings, source, launch)
    account = privileges.resolve_account(settings.user, settings.group)  # before binding
    logs.configure(settings.log_level, settings.log_format)
    service = Service(settings, source=source, launch=launch)
    if account is not None:
        privileges.drop_privileges(account)  # bound as root; serve as --user/--group
    return service.run()


def check_config_main(argv: Sequence[str]) -> int:
    """``echod check-config [--config PATH] [flags]``: validate as ``nginx -t`` does.

    Prints ``configuration ok`` (exit 0), or each problem on stderr (exit 2).
    Nothing is bound, opened or started.
    """
    parser = Parser(
        prog="echod check-config",
        description="Check a config file and flags as echod would read them; start nothing.",
    )
    add_config_argument(parser)
    add_arguments(parser)
    source_from_args(parser, argv).load()  # main() prints each problem, exit 2
    print("configuration ok")
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "check-config": check_config_main,
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
        # Under systemd each sentence reaches the journal as an error (journalctl -p err).
        problems = err.problems if isinstance(err, ConfigError) else [str(err)]
        for problem in problems:
            print(f"{logs.journal_prefix(logs.ERROR_PRIORITY)}echod: {problem}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output left early (echod ctl list | head -1): no
        # traceback, and no second error when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
