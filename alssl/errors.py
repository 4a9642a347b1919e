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


SEED_MAX = 2**32 - 1  # seeds feed numpy / torch generators and crc32 step seeds: 32 bits


def check_seed(seed, name: str = "--seed") -> None:
    """Refuse a seed that is not an integer in 0..2^32-1 (one message for every stage; no torch import)."""
    if type(seed) is not int or not 0 <= seed <= SEED_MAX:
        raise UserError(f"{name} must be an integer in 0..{SEED_MAX}, got {seed!r}; "
                        f"pick one in that range, e.g. {name} 0")


def check_positive(value, name: str, example: str | None = None) -> None:
    """Refuse a number that is not finite and > 0 (learning rates, temperatures); no torch import."""
    import math

    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be a finite number > 0, got {value!r}; e.g. {example or f'{name} 0.05'}")


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
