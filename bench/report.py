"""The lines every side-by-side bench prints: the machine's load, and the ratio over interleaved rounds."""

from __future__ import annotations

import os
import statistics


def load_average() -> str:
    """'0.98 1.10 1.77': the 1 / 5 / 15-minute load average (a bench run on a busy machine says so)."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def spread(values: list[float]) -> str:
    """'x1.19 (min 0.88, max 1.30)': median of per-round ratios with their range."""
    return f"x{statistics.median(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def print_ratio(ratios: list[float]) -> None:
    """The last two lines of a bench: rounds with min / max, then `ratio=` = the median over rounds."""
    print(f"rounds={len(ratios)} min={min(ratios):.2f} max={max(ratios):.2f}")
    print(f"ratio={statistics.median(ratios):.2f}")
