"""Budget-curve grids: cumulative rounds, kill -9 resume without duplicate rows, plots, configs."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

GRID = ["curve", "--data", "digits", "--strategies", "random,kcenter", "--budgets", "1%,2%,5%", "--seeds", "2",
        "--epochs", "0", "-q"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(r: dict) -> tuple:
    return (r["arm"], r["probe"], r["strategy"], r["seed"], r["round"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("curve") / "full"
    r = run_cli(*GRID, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_grid_rows_are_cumulative_and_complete(uninterrupted):
    rows = _rows(uninterrupted / "curve.csv")
    assert len(rows) == 2 * 3 * 2 and len({_key(r) for r in rows}) == len(rows)
    for r in rows:
        assert int(r["n_labeled"]) == {"0": 14, "1": 29, "2": 72}[r["round"]]  # 1%, 2%, 5% of 1437
        assert 0.0 <= float(r["accuracy"]) <= 1.0
    import json

    for f in (uninterrupted / "cells").glob("*.json"):
        labeled = json.loads(f.read_text())["labeled"]
        assert len(labeled) == 72 and len(set(labeled)) == 72  # each round extends the previous set


def test_killed_grid_resumes_only_missing_cells(uninterrupted, tmp_path):
    out = tmp_path / "grid"
    killed = run_cli(*GRID, "--out", str(out), env={"ALSSL_FAULT_AT": "curve-after-cell", "ALSSL_FAULT_AFTER": "4"})
    assert killed.returncode == -signal.SIGKILL
    import json

    done_before = sum(len(json.loads(f.read_text())["rows"]) for f in (out / "cells").glob("*.json"))
    assert done_before == 4
    rerun = run_cli(*GRID, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    rows, ref = _rows(out / "curve.csv"), _rows(uninterrupted / "curve.csv")
    assert len(rows) == 12 and len({_key(r) for r in rows}) == 12
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in ref]


def test_rerun_with_other_arguments_is_refused(uninterrupted):
    r = run_cli(*[a if a != "2" else "3" for a in GRID], "--out", str(uninterrupted))
    assert r.returncode == 2 and "same arguments" in r.stderr


def test_plot_files_axes_and_legend(uninterrupted):
    svg = (uninterrupted / "curve.svg").read_text()
    png = (uninterrupted / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for text in ("test accuracy (%)", "labeled fraction of the pool", "labels per class", "gain over random",
                 "random", "kcenter", "linear probe", "strategy"):
        assert text in svg, text
    table = (uninterrupted / "curve.md").read_text().splitlines()
    rand = next(l for l in table if l.startswith("| random |"))
    kc = next(l for l in table if l.startswith("| kcenter |"))
    assert rand.count("±") == 3 and kc.count("(") == 3  # 3 budgets; kcenter's gain over random per budget


def test_plot_only_redraws(uninterrupted):
    (uninterrupted / "curve.png").unlink()
    r = run_cli("curve", "--plot-only", str(uninterrupted))
    assert r.returncode == 0, r.stderr
    assert (uninterrupted / "curve.png").exists()


def test_shipped_pipelines_parse():
    from alssl.config import load_config

    files = sorted((ROOT / "pipelines").glob("*.toml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg.curve.strategies and cfg.curve.budgets
