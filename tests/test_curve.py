"""Budget-curve grids: cumulative rounds, kill -9 resume without duplicate rows, plots, configs."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, copy_of, run_cli  # a subprocess: for the runs that are killed
from conftest import run_cli_inprocess as run_main  # the same entry point in-process, without a ~4 s import

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
    r = run_main(*GRID, "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_grid_rows_are_cumulative_and_complete(uninterrupted):
    rows = _rows(uninterrupted / "curve.csv")
    assert len(rows) == 2 * 3 * 2 and len({_key(r) for r in rows}) == len(rows)
    for r in rows:
        assert int(r["n_labeled"]) == {"0": 14, "1": 29, "2": 72}[r["round"]]  # 1%, 2%, 5% of 1437
        assert 0.0 <= float(r["accuracy"]) <= 1.0

    for f in (uninterrupted / "cells").glob("*.json"):
        labeled = json.loads(f.read_text())["labeled"]
        assert len(labeled) == 72 and len(set(labeled)) == 72  # each round extends the previous set


def test_killed_grid_resumes_only_missing_cells(uninterrupted, tmp_path):
    out = tmp_path / "grid"
    killed = run_cli(*GRID, "--out", str(out), env={"ALSSL_FAULT_AT": "curve-after-cell", "ALSSL_FAULT_AFTER": "4"})
    assert killed.returncode == -signal.SIGKILL

    done_before = sum(len(json.loads(f.read_text())["rows"]) for f in (out / "cells").glob("*.json"))
    assert done_before == 4
    rerun = run_main(*GRID, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    rows, ref = _rows(out / "curve.csv"), _rows(uninterrupted / "curve.csv")
    assert len(rows) == 12 and len({_key(r) for r in rows}) == 12
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in rows] == [drop(r) for r in ref]


def test_rerun_with_other_arguments_is_refused(uninterrupted):
    r = run_main(*[a if a != "2" else "3" for a in GRID], "--out", str(uninterrupted))
    assert r.returncode == 2 and "same arguments" in r.stderr


def test_semi_arm_rows_and_kill_9_resume(tmp_path):
    """The curve's semi arm: one `semi:fixmatch` row beside each probe row, on the same labels; a kill -9 inside a
    semi fine-tune resumes to the same rows as an uninterrupted grid."""
    grid = ["curve", "--data", "digits", "--strategies", "random,margin", "--budgets", "2%,5%", "--seeds", "1",
            "--probe", "linear", "--epochs", "0", "--semi", "fixmatch", "--semi-steps", "6",
            "--semi-batch-size", "16", "--semi-mu", "2", "-q"]
    full = run_main(*grid, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    rows = _rows(tmp_path / "full" / "curve.csv")
    assert sorted({r["arm"] for r in rows}) == ["probe", "semi:fixmatch"] and len(rows) == 2 * 2 * 2
    for r in rows:
        twin = next(t for t in rows if t["arm"] != r["arm"] and _key(t)[1:] == _key(r)[1:])
        assert r["n_labeled"] == twin["n_labeled"] and 0.0 < float(r["accuracy"]) <= 1.0
    killed = run_cli(*grid, "--out", str(tmp_path / "cut"), env={"ALSSL_FAULT_AFTER_STEPS": "3"})
    assert killed.returncode == -signal.SIGKILL  # inside the first semi fine-tune, before its cell was saved
    assert not list((tmp_path / "cut" / "cells").glob("*.json"))
    again = run_main(*grid, "--out", str(tmp_path / "cut"))
    assert again.returncode == 0, again.stderr
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in _rows(tmp_path / "cut" / "curve.csv")] == [drop(r) for r in rows]
    table = (tmp_path / "full" / "curve.md").read_text()
    assert "**semi:fixmatch − linear probe on the same labels**" in table
    pr, se = (next(r for r in rows if r["arm"] == arm and r["strategy"] == "margin" and r["round"] == "1")
              for arm in ("probe", "semi:fixmatch"))
    gain = (float(se["accuracy"]) - float(pr["accuracy"])) * 100  # one seed: the paired mean is this difference
    assert "| margin | " in table.split("on the same labels")[1] \
            and f"{gain:+.1f} |" in table.split("on the same labels")[1]


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has stopped running
    except FileNotFoundError:
        return False


def test_sigterm_stops_a_parallel_grid_and_its_workers(tmp_path):
    """`kill PID` on `curve --jobs 2` exits 143 with one error line and stops the workers with it (a process pool's
    shutdown would have waited for every queued chain). Resuming a stopped grid: test_killed_grid_resumes_..."""
    out = tmp_path / "g"
    args = ["curve", "--data", "digits", "--strategies", "random,margin", "--budgets", "2%,5%", "--seeds", "2",
            "--epochs", "0", "--semi", "fixmatch", "--semi-steps", "200", "--semi-batch-size", "16", "--semi-mu", "2",
            "--jobs", "2", "-q", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "alssl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    deadline = time.monotonic() + 300
    while not (out / "semi").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == 143 and len(lines) == 1 and lines[0].startswith("error: terminated"), err
    time.sleep(0.5)
    assert not any(_alive(p) for p in workers)
    done = sum(len(json.loads(f.read_text())["rows"]) for f in (out / "cells").glob("*.json"))
    assert done < 16  # 4 chains x 2 budgets x 2 arms: the grid did not run on behind the exit


def test_plot_files_axes_and_legend(uninterrupted):
    svg = (uninterrupted / "curve.svg").read_text()
    png = (uninterrupted / "curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    for text in ("test accuracy (%)", "labeled fraction of the pool", "labeled images (per class)", "gain over random",
                 "random", "kcenter", "linear probe", "strategy",
                 "digits: random-init (cnn) features, linear probe",  # the demo's kind of title, made from the grid
                 ">1%<", ">2%<", ">5%<",  # budget ticks as typed (not 0.97 for 1 % of 1437 = 14 images)
                 ">14<", ">29<", ">72<"):  # the label-count axis
        assert text in svg, text
    assert ">0.97<" not in svg
    table = (uninterrupted / "curve.md").read_text().splitlines()
    rand = next(l for l in table if l.startswith("| random |"))
    kc = next(l for l in table if l.startswith("| kcenter |"))
    assert rand.count("±") == 3 and kc.count("(") == 3  # 3 budgets; kcenter's gain over random per budget


def test_plot_only_redraws(uninterrupted):
    (uninterrupted / "curve.png").unlink()
    r = run_main("curve", "--plot-only", str(uninterrupted))
    assert r.returncode == 0, r.stderr
    assert (uninterrupted / "curve.png").exists()
    assert "digits: random-init (cnn) features, linear probe" in (uninterrupted / "curve.svg").read_text()


def test_shipped_pipelines_parse():
    from alssl.config import load_config

    files = sorted((ROOT / "pipelines").glob("*.toml"))
    assert files
    for f in files:
        cfg = load_config(f)
        assert cfg.curve.strategies and cfg.curve.budgets


# ---------------------------------------------------------------- damaged grid files
# (issue 17; CLI cases in test_bad_inputs.py)
def _damage_cell(uninterrupted, tmp_path, edit):
    out = copy_of(uninterrupted, tmp_path / "g")
    f = out / "cells" / "linear__kcenter__s1.json"
    cell = json.loads(f.read_text())
    edit(cell)
    f.write_text(json.dumps(cell))
    return out


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(labeled=c["labeled"][:10]), "do not match its 10 labeled"),
    (lambda c: c.update(labeled=c["labeled"] + c["labeled"][:1]), "duplicate"),
    (lambda c: c.update(labeled=[-1] + c["labeled"][1:]), "non-index"),
    (lambda c: c["rows"][0].update(round=7), "round 7"),
    (lambda c: c["rows"][0].update(accuracy="high"), "non-numeric"),
    (lambda c: c["rows"].pop(0), "rounds [1, 2]"),
    (lambda c: c.pop("rows"), '"labeled" and "rows"'),
])
def test_damaged_cell_is_refused_before_anything_is_rewritten(uninterrupted, tmp_path, edit, needle):
    from alssl.curves import Grid, check_grid_dir
    from alssl.errors import UserError

    out = _damage_cell(uninterrupted, tmp_path, edit)

    grid = Grid(**json.loads((out / "grid.json").read_text()))
    with pytest.raises(UserError, match="linear__kcenter__s1.json is damaged") as exc:
        check_grid_dir(out, grid, n_pool=1437, counts=[14, 29, 72])
    assert needle in str(exc.value) and "delete it" in str(exc.value)


@pytest.mark.parametrize("text, needle", [
    (b"\xff\xfe\x00", "malformed"),
    (b"a,b\n1,2\n", "no column"),
    (b"arm,probe,strategy,seed,round,fraction,labels_per_class,accuracy\n"
     b"probe,linear,random,0,0,0,1.4,0.5\n", "line 2"),
    (b"arm,probe,strategy,seed,round,fraction,labels_per_class,accuracy\n"
     b"probe,linear,random,x,0,0.1,1.4,0.5\n", "line 2"),
    (b"arm,probe,strategy,seed,round,fraction,labels_per_class,accuracy\nprobe,linear,random,0,0,0.1,1.4\n", "line 2"),
    (b"arm,probe,strategy,seed,round,fraction,labels_per_class,accuracy\n"
     b"probe,linear,random,0,0,0.1,1.4,nan\n", "line 2"),
    (b"arm,probe,strategy,seed,round,fraction,labels_per_class,accuracy\nprobe,linear,random,0,0,0.1,1.4,0.5\n"
     b"probe,linear,random,0,0,0.1,1.4,0.5\n", "repeats"),
    (b"arm,probe,strategy,seed,round,fraction,labels_per_class,accuracy\n"
     b"probe,linear,random,0,1,0.1,1.4,0.5\n", "skips a round"),
])
def test_malformed_curve_csv_is_a_user_error(tmp_path, text, needle):
    from alssl.errors import UserError
    from alssl.plots import plot_curve

    f = tmp_path / "curve.csv"
    f.write_bytes(text)
    with pytest.raises(UserError, match="rebuilt from cells/") as exc:
        plot_curve(f)
    assert needle in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.csv"]


def test_curve_from_an_existing_run_draws_its_title(tmp_path):
    """`--from RUN` reuses a run's backbone (here: no pretraining, the grid only); the figure is drawn with a title."""
    from conftest import run_cli_inprocess

    assert run_cli_inprocess("pretrain", "--data", "digits", "--out", str(tmp_path / "run"), "--epochs", "0",
                             "-q").returncode == 0
    r = run_cli_inprocess("curve", "--data", "digits", "--from", str(tmp_path / "run"), "--strategies", "random",
                          "--budgets", "2%", "--seeds", "1", "--out", str(tmp_path / "c"), "--balance", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "curve.png").stat().st_size > 0
    assert json.loads((tmp_path / "c" / "grid.json").read_text())["options"] == {"balance": True}
