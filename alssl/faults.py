"""Fault injection for the kill -9 tests (documented in docs/reliability.md; inert unless the env var is set).

`ALSSL_FAULT_AT=<point>` makes the process SIGKILL itself when it reaches `fault_point("<point>")`, and
`ALSSL_FAULT_AFTER=<n>` (with ALSSL_FAULT_AT=<point>) only on the n-th time it gets there. Points:
`query-after-csv` (query CSV written, state not yet), `curve-after-cell` (a curve cell saved).
`ALSSL_FAULT_DISK_FULL=1` makes every atomic write fail as if the disk were full.
Stage 1 and stage 4 loops honour `ALSSL_FAULT_AFTER_STEPS=<k>` (kill after k optimizer steps): `fault_after_steps`.
"""

from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here if ALSSL_FAULT_AT names this point (and its hit count is reached)."""
    if os.environ.get("ALSSL_FAULT_AT") != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(os.environ.get("ALSSL_FAULT_AFTER", "1")):
        os.kill(os.getpid(), signal.SIGKILL)


STEPS_ENV = "ALSSL_FAULT_AFTER_STEPS"


def fault_after_steps(done: int) -> None:
    """SIGKILL this process right after the loop's step count `done` reaches ALSSL_FAULT_AFTER_STEPS=k (k >= 1).

    Call it once per optimizer step with the count the loop keeps: stage 1 passes the steps this process has done,
    stage 4 the steps of the run (so a resumed fine-tune is not killed again by the same k).
    """
    k = os.environ.get(STEPS_ENV)
    if k and done == int(k):
        os.kill(os.getpid(), signal.SIGKILL)
