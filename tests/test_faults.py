"""kill -9 at several points, then rerun: every stage ends in the same state as an uninterrupted run.

Stage 1's weights-level check is `tests/test_pretrain.py::test_killed_pretrain_resumes_to_the_same_weights`, the curve
grid's is `tests/test_curve.py::test_killed_grid_resumes_only_missing_cells`; this file covers query + label,
semi-finetune and the run-dir lock. The process that is killed is always a real subprocess; the steps around it call
the same entry point in-process (`run_main`), which saves a ~4 s torch import each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from conftest import run_cli_inprocess as run_main  # the same entry point; the steps that are not killed


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults") / "run"
    r = run_main("pretrain", "--data", "digits", "--out", str(d), "--epochs", "0", "-q")
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
        assert run_main("query", str(run), "--budget", "2%", "--seed", "3").returncode == 0
        assert run_main("label", str(run), "--oracle").returncode == 0
    q = ["--budget", "3%", "--strategy", "kcenter", "--seed", "3"]
    assert run_main("query", str(ref), *q).returncode == 0
    killed = run_cli("query", str(cut), *q, env={"ALSSL_FAULT_AT": "query-after-csv"})
    assert killed.returncode == -signal.SIGKILL
    assert (cut / "queries" / "round-1.csv").exists() and _state(cut)["open_query"] is None
    again = run_main("query", str(cut), *q)
    assert again.returncode == 0, again.stderr
    assert (cut / "queries" / "round-1.csv").read_bytes() == (ref / "queries" / "round-1.csv").read_bytes()
    for run in (ref, cut):
        assert run_main("label", str(run), "--oracle").returncode == 0
    assert _state(cut) == _state(ref)


def test_semi_finetune_killed_and_rerun_matches(base, tmp_path):
    ref, cut = _copy(base, tmp_path / "ref"), _copy(base, tmp_path / "cut")
    for run in (ref, cut):
        assert run_main("query", str(run), "--budget", "40", "--seed", "1").returncode == 0
        assert run_main("label", str(run), "--oracle").returncode == 0
    args = ["--method", "fixmatch", "--steps", "8", "--batch-size", "16", "--mu", "2", "--ckpt-every", "3", "-q"]
    full = run_main("semi-finetune", str(ref), *args)
    assert full.returncode == 0, full.stderr
    killed = run_cli("semi-finetune", str(cut), *args, env={"ALSSL_FAULT_AFTER_STEPS": "5"})
    assert killed.returncode == -signal.SIGKILL
    again = run_main("semi-finetune", str(cut), *args)
    assert again.returncode == 0, again.stderr
    a, b = json.loads(full.stdout.splitlines()[-1]), json.loads(again.stdout.splitlines()[-1])
    assert abs(a["accuracy"] - b["accuracy"]) <= 1e-6


def _semi_state(run: Path) -> dict:
    import torch

    (path,) = (run / "semi").glob("*/state.pt")
    return torch.load(path, weights_only=True)


def _equal(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_semi_finetune_on_two_processes_killed_and_rerun_matches(base, tmp_path):
    """Stage 4 under DDP, 2 gloo processes on the CPU (issue 28): rank 0 checkpoints, both ranks are killed (-9) after
    step 5, the rerun resumes from step 4 on both ranks and ends bit-identical to an uninterrupted 2-process run:
    student, teacher, optimizer and SimMatch's bank and distribution-alignment queue (the state gathered over ranks)."""
    ref, cut = _copy(base, tmp_path / "ref"), _copy(base, tmp_path / "cut")
    for run in (ref, cut):
        assert run_main("query", str(run), "--budget", "40", "--seed", "1").returncode == 0
        assert run_main("label", str(run), "--oracle").returncode == 0
    args = ["--method", "simmatch", "--steps", "7", "--batch-size", "8", "--mu", "2", "--ckpt-every", "2",
            "--accelerator", "cpu", "--devices", "2", "-q"]

    def start(run: Path, **env) -> subprocess.Popen:  # no MASTER_PORT given: each run's rank 0 picks a free port
        base_env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
        return subprocess.Popen([sys.executable, "-m", "alssl", "semi-finetune", str(run), *args], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**base_env, **env})

    # the uninterrupted run beside the killed one (the ~10 s of imports per process overlap)
    full, killed = start(ref), start(cut, ALSSL_FAULT_AFTER_STEPS="5")
    try:
        out, err = full.communicate(timeout=300)
        _, killed_err = killed.communicate(timeout=300)
    finally:
        full.kill()
        killed.kill()
    assert full.returncode == 0, err
    assert killed.returncode == -signal.SIGKILL, killed_err
    assert _semi_state(cut)["step"] == 4  # rank 0's last checkpoint before the kill
    again = start(cut)
    try:
        again_out, again_err = again.communicate(timeout=300)
    finally:
        again.kill()
    assert again.returncode == 0, again_err
    for res in (out, again_out):  # one JSON line: rank 1 prints nothing
        (line,) = res.strip().splitlines()
        assert json.loads(line)["devices"] == 2 and json.loads(line)["ranks_in_sync"] is True
    a, b = _semi_state(ref), _semi_state(cut)
    assert a["step"] == b["step"] == 7
    for part in ("model", "teacher", "optimizer", "method"):
        assert _equal(a[part], b[part]), part
    (d,) = (cut / "semi").iterdir()
    assert [json.loads(l)["step"] for l in (d / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 7]
    assert sum(json.loads(l).get("stage") == "semi" for l in (cut / "metrics.jsonl").read_text().splitlines()) == 1


def test_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(base, tmp_path):
    run = _copy(base, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from alssl.runs import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = run_main("query", str(run), "--budget", "5")
        assert busy.returncode == 2 and f"pid {holder.pid}" in busy.stderr, busy.stderr
        assert not (run / "queries").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").exists()  # the dead holder's lock file is still there ...
    ok = run_main("query", str(run), "--budget", "5")  # ... and is taken over
    assert ok.returncode == 0, ok.stderr
    assert not (run / ".lock").exists()


# ---------------------------------------------------------------- concurrency: no import lost or claimed twice
def _cli_exit(argv: list[str]) -> None:
    """Child process body: the real entry point, its exit code as the process's."""
    import contextlib
    import io
    import os

    from alssl.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    if code not in (0, 2):
        print(err.getvalue(), file=sys.__stderr__)
    os._exit(code)


@pytest.fixture(scope="module")
def open_round(base, tmp_path_factory) -> Path:
    """A digits run with round 0 labeled, its features cached, and round 1's query (20 images) open."""
    run = _copy(base, tmp_path_factory.mktemp("conc") / "run")
    for args in (["query", str(run), "--budget", "20"], ["label", str(run), "--oracle"], ["probe", str(run)],
                 ["query", str(run), "--budget", "20"]):
        r = run_main(*args)
        assert r.returncode == 0, r.stderr
    return run


def test_fifty_concurrent_pairs_never_lose_or_double_claim_an_import(open_round, tmp_path, monkeypatch):
    """label + label, label + query, label + probe started together, 50 times (forked real CLI entry points, each
    under the run lock): every open round is imported exactly once, the losing importer exits 2 saying the round is
    already labeled, and state.json always holds the winner's labels and nothing else."""
    import multiprocessing

    monkeypatch.setenv("ALSSL_LOCK_WAIT", "300")  # take turns, however slow this machine is (default: 5 s)

    from alssl.data import load_dataset

    truth = load_dataset("digits").y_train
    ctx = multiprocessing.get_context("fork")
    before = json.loads((open_round / "state.json").read_text())
    idx = before["open_query"]["indices"]
    kinds = [("csv", "oracle"), ("csv", "query"), ("oracle", "probe"), ("oracle", "csv")]
    for trial in range(50):
        run = _copy(open_round, tmp_path / f"t{trial}")
        labels = tmp_path / f"l{trial}.csv"
        labels.write_text("index,label\n" + "".join(f"{i},{truth[i]}\n" for i in idx))
        argv = {"csv": ["label", str(run), "--from", str(labels)], "oracle": ["label", str(run), "--oracle"],
                "query": ["query", str(run), "--budget", "7", "--seed", "1"], "probe": ["probe", str(run)]}
        a, b = kinds[trial % len(kinds)]
        procs = [ctx.Process(target=_cli_exit, args=(argv[k],)) for k in (a, b)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        codes = [p.exitcode for p in procs]
        state = json.loads((run / "state.json").read_text())
        assert len(state["rounds"]) == 2 and state["rounds"][1]["n"] == len(idx), (trial, a, b, codes)
        assert sum(r == 1 for r in state["labeled_round"]) == len(idx)
        assert all(state["labels"][i] == truth[i] for i in idx)
        if b in ("csv", "oracle"):  # two importers of one round: exactly one wins
            assert sorted(codes) == [0, 2], (trial, a, b, codes)
        else:
            assert codes[0] == 0 and codes[1] in (0, 2), (trial, a, b, codes)
        if b == "query" and codes[1] == 0 and state["open_query"] is not None:
            assert state["open_query"]["round"] == 2  # the query ran after the import, never before it


def test_losing_importer_is_told_the_round_is_already_labeled(open_round, tmp_path):
    run = _copy(open_round, tmp_path / "run")
    assert run_main("label", str(run), "--oracle").returncode == 0
    again = run_main("label", str(run), "--oracle")
    assert again.returncode == 2 and "round 1 is already labeled (20 labels from oracle)" in again.stderr, again.stderr


# ---------------------------------------------------------------- Ctrl-C / SIGTERM
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_exits_with_one_error_line_and_the_rerun_resumes(tmp_path, sig, code, word):
    run = tmp_path / "run"
    # the first checkpoint comes after 5 of the 44 steps: the signal lands mid-training even on a loaded machine
    # (a checkpoint only at the end of epoch 1 left one short epoch, which a busy CI machine could finish first)
    args = ["pretrain", "--data", "digits", "--out", str(run), "--epochs", "2", "--batch-size", "64",
            "--knn-every", "0", "--ckpt-every-steps", "5", "-q"]
    # SIGINT back to its default in the child: a test run started as a background job (`make test &`) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler (the child would finish with exit 0)
    proc = subprocess.Popen([sys.executable, "-m", "alssl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = run / "checkpoints" / "pretrain-state.pt"
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    lines = [l for l in err.splitlines() if l.strip()]
    assert proc.returncode == code, (proc.returncode, err)
    assert len(lines) == 1 and lines[0].startswith(f"error: {word}") and "rerun the same command" in lines[0], err
    assert "Traceback" not in err and not (run / ".lock").exists()
    from alssl.pretraining import load_state

    assert load_state(run)["step"] > 0  # the last checkpoint is intact
    done = run_main(*args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 2 * (1437 // 64)
