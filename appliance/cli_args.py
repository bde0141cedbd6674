"""What the CLI's command modules share: argument types for names, one-line usage errors, and the report of a bug."""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from appliance.errors import ApplianceError, InvalidName
from appliance.names import JOB_ID, POINT_REF, SESSION_NAME, VM_NAME, VOLUME_REF, NameRule


def name_argument(rule: NameRule) -> Callable[[str], str]:
    """An argparse type that refuses a name breaking `rule` before any command runs."""

    def parse(value: str) -> str:
        try:
            return rule.check(value)
        except InvalidName as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line on stderr and exit code 2, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"appliance: error: {message} (see {self.prog} --help)\n")


Handler = Callable[[argparse.Namespace], int]
#: How a command module adds a command: `command(name, handler, help)` -> its parser.
Command = Callable[[str, Handler, str], argparse.ArgumentParser]

#: Where journald (or syslogd) takes log lines on a Linux host.
SYSLOG_SOCKET = "/dev/log"

VM_ARG = name_argument(VM_NAME)
SESSION_ARG = name_argument(SESSION_NAME)
POINT_ARG = name_argument(POINT_REF)
JOB_ARG = name_argument(JOB_ID)
VOLUME_ARG = name_argument(VOLUME_REF)


def report_internal_error(exc: Exception, debug: bool) -> None:
    """One line on stderr; the traceback to the system log (when there is one) and, with --debug, to stderr."""
    summary = f"{type(exc).__name__}: {exc}"
    print(f"appliance: internal error: {summary}" + ("" if debug else " (--debug shows the traceback)"),
          file=sys.stderr)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if os.path.exists(SYSLOG_SOCKET):
        logger = logging.getLogger("appliance.cli")
        logger.propagate = False
        with contextlib.suppress(OSError):  # a log that cannot be reached must not hide the error
            logger.addHandler(logging.handlers.SysLogHandler(address=SYSLOG_SOCKET))
            logger.error("appliance: internal error in %s: %s", " ".join(sys.argv[1:]), summary, exc_info=exc)


def store_path(args: argparse.Namespace) -> Path:
    if not args.store:
        raise ApplianceError("no store given: pass --store DIR or set APPLIANCE_STORE")
    return Path(args.store)
