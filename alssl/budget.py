"""The budget grammar of the contract: `2%` (of the training pool, rounded, at least 1) or `500` (a count)."""

from __future__ import annotations

import re

from alssl.errors import UserError

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*%\s*$")
_COUNT = re.compile(r"^\s*[+]?(\d+)\s*$")


def budget_count(budget: str, *, n_pool: int) -> int:
    """The number of samples `budget` asks for out of a pool of `n_pool` (before checking what is left)."""
    text = str(budget)
    if m := _PERCENT.match(text):
        pct = float(m.group(1))
        if pct <= 0 or pct > 100:
            raise UserError(f"budget {text!r} must be a percentage in (0, 100]; e.g. --budget 2%")
        return max(1, round(pct / 100 * n_pool))
    if m := _COUNT.match(text):
        n = int(m.group(1))
        if n <= 0:
            raise UserError(f"budget {text!r} must be at least 1 sample; e.g. --budget 500 or --budget 2%")
        return n
    raise UserError(f"budget {text!r} is not a count or a percentage; write e.g. --budget 500 or --budget 2%")


def parse_budget(budget: str, *, n_pool: int, n_unlabeled: int) -> int:
    """`budget_count`, also rejecting budgets larger than the unlabeled samples left."""
    n = budget_count(budget, n_pool=n_pool)
    if n > n_unlabeled:
        raise UserError(
            f"budget {budget!r} asks for {n} samples but only {n_unlabeled} unlabeled samples are left; ask for fewer"
        )
    return n
