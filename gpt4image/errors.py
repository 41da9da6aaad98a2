"""One exception type for mistakes in what the user gave us (files, values, flags).

Entry points catch it, print its one-line message and exit with status 2 before anything is
written; every other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import TypeVar
from collections.abc import Callable

Result = TypeVar("Result")


class UserError(Exception):
    """Bad input: the message names the file or value and says how to fix it."""


def exit_on_user_error(main: Callable[[list[str] | None], Result], argv: list[str] | None = None) -> Result:
    """Run ``main(argv)``; turn a UserError into ``error: <message>`` on stderr and exit code 2."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        sys.exit(2)


def one_line(error: BaseException) -> str:
    """The message of a UserError, also when a DataLoader worker re-raised it with its traceback."""
    text = str(error).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split("UserError: ", 1)[-1]
    return " ".join(text.split())  # a message that quotes a library's several lines stays one line
