"""The one exception type for bad user input.

The CLI turns a :class:`UserError` into exit code 2 and a single ``error: ...`` line on stderr,
with no traceback. Anything else that escapes is a bug (exit 1, traceback allowed).
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable


class UserError(Exception):
    """Bad input. The message says what is wrong *and* how to fix it, in one line."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f' (did you mean "{match[0]}"?)' if match else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """A UserError for an unknown registry name, with a suggestion and the valid choices."""
    choices = sorted(choices)
    return UserError(f'unknown {kind} "{name}"{suggest(name, choices)}; choose one of: {", ".join(choices)}')


def warn(message: str) -> None:
    """One `warning: ...` line on stderr: something the user should know that does not stop the command."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
