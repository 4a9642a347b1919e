"""kill -9 at several points, then rerun: every stage ends in the same state as an uninterrupted run.

Stage 1's weights-level check is `tests/test_pretrain.py::test_killed_pretrain_resumes_to_the_same_weights`, the curve
grid's is `tests/test_curve.py::test_killed_grid_resumes_only_missing_cells`; this file covers query + label,
semi-finetune and the run-dir lock through real subprocesses.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults") / "run"
    r = run_cli("pretrain", "--data", "digits", "--out", str(d), "--epochs", "0", "-q")
    assert r.returncode == 0, r.stderr
    return d


def _copy(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def _state(run: Path) -> dict:
    s = json.loads((run / "state.json").read_text())
    return {k: s[k] for k in ("labeled_round", "labels", "open_query")} | {"n_rounds": len(s["rounds"])}


def test_kill_between_query_csv_and_state_then_label(base, tmp_path):
    ref, cut = _copy(base, tmp_path / "ref"), _copy(base, tmp_path / "cut")
    for run in (ref, cut):  # round 0: random 2 %, labeled
        assert run_cli("query", str(run), "--budget", "2%", "--seed", "3").returncode == 0
        assert run_cli("label", str(run), "--oracle").returncode == 0
    q = ["--budget", "3%", "--strategy", "kcenter", "--seed", "3"]
    assert run_cli("query", str(ref), *q).returncode == 0
    killed = run_cli("query", str(cut), *q, env={"ALSSL_FAULT_AT": "query-after-csv"})
    assert killed.returncode == -signal.SIGKILL
    assert (cut / "queries" / "round-1.csv").exists() and _state(cut)["open_query"] is None
    again = run_cli("query", str(cut), *q)
    assert again.returncode == 0, again.stderr
    assert (cut / "queries" / "round-1.csv").read_bytes() == (ref / "queries" / "round-1.csv").read_bytes()
    for run in (ref, cut):
        assert run_cli("label", str(run), "--oracle").returncode == 0
    assert _state(cut) == _state(ref)


def test_semi_finetune_killed_and_rerun_matches(base, tmp_path):
    ref, cut = _copy(base, tmp_path / "ref"), _copy(base, tmp_path / "cut")
    for run in (ref, cut):
        assert run_cli("query", str(run), "--budget", "40", "--seed", "1").returncode == 0
        assert run_cli("label", str(run), "--oracle").returncode == 0
    args = ["--method", "fixmatch", "--steps", "8", "--batch-size", "16", "--mu", "2", "--ckpt-every", "3", "-q"]
    full = run_cli("semi-finetune", str(ref), *args)
    assert full.returncode == 0, full.stderr
    killed = run_cli("semi-finetune", str(cut), *args, env={"ALSSL_FAULT_AFTER_STEPS": "5"})
    assert killed.returncode == -signal.SIGKILL
    again = run_cli("semi-finetune", str(cut), *args)
    assert again.returncode == 0, again.stderr
    a, b = json.loads(full.stdout.splitlines()[-1]), json.loads(again.stdout.splitlines()[-1])
    assert abs(a["accuracy"] - b["accuracy"]) <= 1e-6


def test_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(base, tmp_path):
    run = _copy(base, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from alssl.runs import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = run_cli("query", str(run), "--budget", "5")
        assert busy.returncode == 2 and f"pid {holder.pid}" in busy.stderr, busy.stderr
        assert not (run / "queries").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").exists()  # the dead holder's lock file is still there ...
    ok = run_cli("query", str(run), "--budget", "5")  # ... and is taken over
    assert ok.returncode == 0, ok.stderr
    assert not (run / ".lock").exists()
