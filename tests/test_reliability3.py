"""Reliability, round three (issue 25): labels never land on other photos, outputs never overwrite a run file or an
input, no orphan decoding workers, every run file validated, every numeric option checked before anything is
written. Each case failed on the code before issue 25.

CLI cases run the entry point in-process (`conftest.run_cli_inprocess`); `assert_user_error` asks for exit 2, one
`error:` line and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import copy_of, snapshot
from conftest import run_cli_inprocess as run_cli
from test_bad_inputs import assert_user_error, check


def _photos(root: Path, n: int, seed: int = 0) -> list[str]:
    """`n` distinct small photos under root (two subfolders); returns their relative paths."""
    rng = np.random.default_rng(seed)
    rels = []
    for i in range(n):
        rel = f"{'a' if i % 2 else 'b'}/img_{i:02d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / rel)
        rels.append(rel)
    return sorted(rels)


@pytest.fixture(scope="module")
def base_folder_run(tmp_path_factory) -> dict:
    """A run on a folder of 8 photos (random init, 16 px), one round of 4 labels imported by path, one query open."""
    root = tmp_path_factory.mktemp("folder")
    photos, run = root / "photos", root / "run"
    rels = _photos(photos, 8)
    r = run_cli("pretrain", "--data", str(photos), "--out", str(run), "--epochs", "0", "--image-size", "16",
                "--classes", "cat,dog", "-q")
    assert r.returncode == 0, r.stderr
    labels = root / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"{rel},{'cat' if k % 2 else 'dog'}\n" for k, rel in enumerate(rels[:4])))
    r = run_cli("label", str(run), "--from", str(labels), "--any")
    assert r.returncode == 0, r.stderr
    r = run_cli("query", str(run), "--budget", "2", "--strategy", "random")
    assert r.returncode == 0, r.stderr
    return {"root": root, "photos": photos, "run": run, "rels": rels}


@pytest.fixture
def folder_run(base_folder_run, tmp_path) -> dict:
    """A private copy of the folder run and its photos (the run's data spec is rewritten to the copy)."""
    photos = copy_of(base_folder_run["photos"], tmp_path / "photos")
    run = copy_of(base_folder_run["run"], tmp_path / "run")
    state = json.loads((run / "state.json").read_text())
    state["config"]["data"]["spec"] = str(photos)
    (run / "state.json").write_text(json.dumps(state))
    return {"photos": photos, "run": run, "rels": base_folder_run["rels"], "tmp": tmp_path}


# ---------------------------------------------------------------- 1. the pool's identity
def test_run_records_its_pool_identity(folder_run):
    pool = json.loads((folder_run["run"] / "state.json").read_text())["config"]["data"]["pool"]
    assert len(pool["ids_sha256"]) == 64 and len(pool["content_sha256"]) == 64
    assert "content_sha256" in (folder_run["run"] / "run.toml").read_text()


@pytest.mark.parametrize("change", ["swap-names", "replace-content"])
def test_same_count_change_and_deleted_pool_is_refused(folder_run, change):
    """A same-count change to the folder + a deleted RUN/pool used to rebuild a shifted pool: labels moved."""
    photos, run, rels = folder_run["photos"], folder_run["run"], folder_run["rels"]
    a, b = photos / rels[0], photos / rels[1]
    if change == "swap-names":
        tmp = photos / "tmp.png"
        a.rename(tmp), b.rename(a), tmp.rename(b)
    else:
        Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(a)
    shutil.rmtree(run / "pool")
    before = snapshot(run)
    r = run_cli("query", str(run), "--budget", "2", "--strategy", "random")
    assert_user_error(r, "not the one this run was made from", "restore the folder")
    assert snapshot(run) == before and not (run / "pool").exists()  # the wrong pool is not left for the next command


def test_deleted_pool_of_an_unchanged_folder_is_rebuilt(folder_run):
    run = folder_run["run"]
    ids = json.loads((run / "pool" / "manifest.json").read_text())["pool"]
    os.utime(folder_run["photos"] / folder_run["rels"][0], (1, 1))  # a touch: same bytes, the rebuild accepts it
    shutil.rmtree(run / "pool")
    r = run_cli("query", str(run), "--budget", "2", "--strategy", "random")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "pool" / "manifest.json").read_text())["pool"] == ids


# ---------------------------------------------------------------- 2. outputs never overwrite inputs or run files
def test_predict_out_never_overwrites_a_run_file_or_an_input(folder_run):
    run, photos = folder_run["run"], folder_run["photos"]
    extra = folder_run["tmp"] / "new"
    _photos(extra, 2, seed=5)
    new_photo = extra / "a" / "img_01.png"
    cases = [
        (run / "state.json", "inside the run dir"),
        (run / "pool" / "pixels.npy", "inside the run dir"),
        (photos / "a" / "img_01.png", "into an input"),
        (photos / "predictions.csv", "into an input"),
        (new_photo, "into an input"),
    ]
    for out, needle in cases:
        before, photos_before = snapshot(run), snapshot(photos)
        new_before = new_photo.read_bytes()
        r = run_cli("predict", str(run), "--data", str(extra), "--out", str(out))
        assert_user_error(r, needle)
        assert snapshot(run) == before and snapshot(photos) == photos_before and new_photo.read_bytes() == new_before
    other = folder_run["tmp"] / "notes.txt"
    other.write_text("my notes\n")
    assert_user_error(run_cli("predict", str(run), "--pool", "--out", str(other)), "--force")
    assert other.read_text() == "my notes\n"
    out = folder_run["tmp"] / "pred.csv"
    for _ in range(2):  # a previous predictions CSV is replaced without --force
        r = run_cli("predict", str(run), "--pool", "--out", str(out))
        assert r.returncode == 0, r.stderr
    assert run_cli("predict", str(run), "--pool", "--out", str(other), "--force").returncode == 0
    assert other.read_text().startswith("path,label,confidence")


def test_export_tasks_and_curve_out_refuse_run_dirs_inputs_and_foreign_files(folder_run, tmp_path):
    run, photos = folder_run["run"], folder_run["photos"]
    for cmd in (["export", str(run)], ["tasks", str(run)]):
        for out, needle in ((run, "inside the run dir"), (run / "checkpoints", "inside the run dir"),
                            (photos / "models", "into an input")):
            check(run, [*cmd, "--out", str(out)], needle)
        foreign = tmp_path / f"{cmd[0]}-foreign"
        foreign.mkdir()
        mine = {"export": "model.json", "tasks": "tasks.json"}[cmd[0]]
        (foreign / mine).write_text("{\"mine\": 1}\n")
        check(run, [*cmd, "--out", str(foreign)], "--force")
        assert (foreign / mine).read_text() == "{\"mine\": 1}\n"
        fine = tmp_path / f"{cmd[0]}-out"
        for _ in range(2):  # an earlier output of the same command is replaced
            r = run_cli(*cmd, "--out", str(fine))
            assert r.returncode == 0, r.stderr
    foreign = tmp_path / "curve-foreign"
    foreign.mkdir()
    (foreign / "curve.csv").write_text("mine\n")
    r = run_cli("curve", "--data", "digits", "--strategies", "random", "--budgets", "10", "--seeds", "1",
                "--epochs", "0", "--out", str(foreign))
    assert_user_error(r, "--force")
    r = run_cli("curve", "--data", "digits", "--strategies", "random", "--budgets", "10", "--seeds", "1",
                "--epochs", "0", "--out", str(run / "curve"))
    assert_user_error(r, "inside the run dir")
    assert (foreign / "curve.csv").read_text() == "mine\n"


# ---------------------------------------------------------------- 3. no orphan workers
WORKER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path

    from alssl.data import images
    from alssl.data.folder import decode_files

    root, pids, dest = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    real = images.decode_image

    def slow_decode(path, size, channels, draft=True):  # (inherited by the forked workers)
        (pids / f"{os.getpid()}.pid").touch()
        time.sleep(120)  # mid-decode until the parent is gone
        return real(path, size, channels, draft)

    images.decode_image = slow_decode
    decode_files(root, sorted(p.name for p in root.iterdir()), dest=dest, image_size=8, workers=2, label="t",
                 quiet=True)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decoding_workers_die_with_a_killed_parent(tmp_path):
    script = tmp_path / "decode.py"
    script.write_text(WORKER_SCRIPT)
    (tmp_path / "pids").mkdir()
    (tmp_path / "photos").mkdir()
    for i in range(260):  # more than 4 chunks of 64: decode_files starts worker processes
        Image.fromarray(np.full((4, 4, 3), i % 256, np.uint8)).save(tmp_path / "photos" / f"{i:03d}.png")
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path / "photos"), str(tmp_path / "pids"),
                               str(tmp_path / "x.npy")],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.monotonic() + 60
        while len(list((tmp_path / "pids").iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [int(p.stem) for p in (tmp_path / "pids").iterdir()]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [w for w in workers if _alive(w)]
    finally:
        parent.kill()
    for w in left:  # (clean up before failing)
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived their killed parent"


# ---------------------------------------------------------------- 6. damaged fine-tune state, ProbCover cache;
# 10. metrics
from test_bad_inputs import base_run, run_dir  # noqa: E402,F401 - the digits run fixtures (one round labeled, one open)


@pytest.fixture(scope="module")
def base_semi_run(base_run, tmp_path_factory) -> Path:
    """`base_run` with a finished 2-step supervised fine-tune on its labels."""
    d = copy_of(base_run, tmp_path_factory.mktemp("semi") / "run")
    r = run_cli("semi-finetune", str(d), "--method", "supervised", "--steps", "2", "--batch-size", "4", "-q")
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture
def semi_run(base_semi_run, tmp_path) -> Path:
    return copy_of(base_semi_run, tmp_path / "semi-run")


def _damage_semi_state(run: Path, how: str) -> None:
    import torch

    state_pt = next((run / "semi").glob("*/state.pt"))
    if how == "garbage":
        state_pt.write_bytes(b"not a checkpoint")
    elif how == "not-a-state":
        torch.save({"x": 1}, state_pt)
    else:  # the head of another shape
        state = torch.load(state_pt, weights_only=True)
        state["teacher"]["head.weight"] = torch.zeros(3, 5)
        torch.save(state, state_pt)


@pytest.mark.parametrize("how", ["garbage", "not-a-state", "wrong-shape"])
def test_damaged_fine_tune_state(semi_run, tmp_path, how):
    _damage_semi_state(semi_run, how)
    check(semi_run, ["export", str(semi_run), "--out", str(tmp_path / "m")], "delete")
    r = run_cli("tasks", str(semi_run), "--out", str(tmp_path / "t"))  # suggestions are dropped with a warning
    assert r.returncode == 0 and "Traceback" not in r.stderr and "warning: no suggestions" in r.stderr, r.stderr


def test_semi_record_is_not_duplicated_when_a_finished_fine_tune_reruns(semi_run):
    """A kill -9 after the record was appended (or a plain rerun) used to add a second `semi` record."""
    r = run_cli("semi-finetune", str(semi_run), "--method", "supervised", "--steps", "2", "--batch-size", "4", "-q")
    assert r.returncode == 0, r.stderr
    records = [json.loads(l) for l in (semi_run / "metrics.jsonl").read_text().splitlines()]
    assert sum(rec["stage"] == "semi" for rec in records) == 1


def test_status_with_a_damaged_probcover_cache(run_dir):
    (run_dir / "features").mkdir(exist_ok=True)
    (run_dir / "features" / "0123456789abcdef.probcover.json").write_text("{not json")
    r = run_cli("status", str(run_dir), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr and "probcover.json is damaged" in r.stderr, r.stderr


# ---------------------------------------------------------------- 9. numeric options checked before anything is written
@pytest.mark.parametrize("args, needle", [
    (["probe", "{run}", "--seed", "-1"], "--seed must be an integer"),
    (["probe", "{run}", "--seed", str(2**70)], "--seed must be an integer"),
    (["query", "{run}", "--budget", "5", "--seed", "-1"], "--seed must be an integer"),
    (["semi-finetune", "{run}", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["semi-finetune", "{run}", "--lr", "-0.1"], "--lr must be a finite number > 0"),
    (["semi-finetune", "{run}", "--method", "simmatch", "--option", "simmatch_T=0"], "option simmatch_T must be"),
    (["semi-finetune", "{run}", "--method", "daso", "--option", "daso_T_proto=0"], "option daso_T_proto must be"),
])
def test_numeric_options_on_a_run(run_dir, args, needle):
    check(run_dir, [a.format(run=run_dir) for a in args], needle)


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-0.1"), ("--lr", "0"),
                                         ("--temperature", "inf"), ("--temperature", "nan")])
def test_numeric_pretrain_options_leave_no_run_dir(tmp_path, flag, value):
    out = tmp_path / "run"
    assert_user_error(run_cli("pretrain", "--data", "digits", "--out", str(out), "--epochs", "1", flag, value), flag)
    assert not out.exists()


def test_nan_init_weights_are_refused(tmp_path):
    import torch

    from alssl.backbones import build_backbone

    sd = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
          for k, v in build_backbone("cnn", 1).state_dict().items()}
    torch.save(sd, tmp_path / "nan.pt")
    out = tmp_path / "run"
    assert_user_error(run_cli("pretrain", "--data", "digits", "--out", str(out), "--epochs", "0", "--init",
                              str(tmp_path / "nan.pt")), "NaN or infinite weights")
    assert not out.exists()


def test_upper_case_npz_extension(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), np.arange(40) % 2
    with open(tmp_path / "DATA.NPZ", "wb") as f:  # (np.savez would add ".npz" to a path)
        np.savez(f, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    r = run_cli("pretrain", "--data", str(tmp_path / "DATA.NPZ"), "--out", str(tmp_path / "run"), "--epochs", "0", "-q")
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- 8. a damaged RUN/pool is refused, never rewritten
def _edit_manifest(run: Path, edit) -> None:
    path = run / "pool" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


POOL_DAMAGE = {
    "garbage-pixels": (lambda run: (run / "pool" / "pixels.npy").write_bytes(b"garbage" * 100), "not an alssl pool"),
    "reversed-names": (lambda run: _edit_manifest(run, lambda m: m["pool"].reverse()), "not this run's pool"),
    "mean-not-numbers": (lambda run: _edit_manifest(run, lambda m: m.update(mean="abc")), "mean must be a list"),
    "pool-not-a-list": (lambda run: _edit_manifest(run, lambda m: m.update(pool=5)), "pool must be a non-empty list"),
    "manifest-not-json": (lambda run: (run / "pool" / "manifest.json").write_text("{"), "corrupt"),
    "other-image-size": (lambda run: np.save(run / "pool" / "pixels.npy", np.zeros((8, 8, 8, 3), np.uint8)),
                         "holds images [8, 8, 8, 3]"),
    "other-channels": (lambda run: np.save(run / "pool" / "pixels.npy", np.zeros((8, 16, 16, 1), np.uint8)),
                       "holds images [8, 16, 16, 1]"),
}


@pytest.mark.parametrize("case", sorted(POOL_DAMAGE))
def test_damaged_pool_is_refused(folder_run, case):
    damage, needle = POOL_DAMAGE[case]
    damage(folder_run["run"])
    check(folder_run["run"], ["query", str(folder_run["run"]), "--budget", "2", "--strategy", "random"], needle,
          f"delete {folder_run['run'] / 'pool'}")


def test_garbage_test_cache_is_rebuilt(tmp_path):
    from alssl.data.folder import load_test_folder

    for c in ("cat", "dog"):
        _photos(tmp_path / "test" / c, 2, seed=len(c))
    (tmp_path / "pool").mkdir()
    kw = dict(classes=["cat", "dog"], image_size=8, channels=3, workers=1)
    x, y, _ = load_test_folder(tmp_path / "test", tmp_path / "pool", **kw)
    for garbage in (b"PK\x03\x04 not a zip", b"garbage"):
        (tmp_path / "pool" / "test.npz").write_bytes(garbage)
        x2, y2, _ = load_test_folder(tmp_path / "test", tmp_path / "pool", **kw)
        assert np.array_equal(x, x2) and np.array_equal(y, y2)


# ---------------------------------------------------------------- 4. ids are exact; 5. unreadable subfolders reported
ODD_NAMES = [" leading.png", "trailing .png", 'quo"te, comma.png', "new\nline.png", os.fsdecode(b"caf\xe9.png")]


def test_odd_file_names_round_trip_through_query_label_and_the_page(tmp_path):
    import csv

    photos, run = tmp_path / "photos", tmp_path / "run"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for name in ODD_NAMES + ["plain_0.png", "plain_1.png", "plain_2.png", "plain_3.png"]:
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(photos / name)
    r = run_cli("pretrain", "--data", str(photos), "--out", str(run), "--epochs", "0", "--image-size", "8",
                "--classes", "cat,dog", "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("query", str(run), "--budget", "4", "--strategy", "random", "--seed", "3")
    assert r.returncode == 0, r.stderr
    with open(r.stdout.strip(), newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))[1:]
    with open(tmp_path / "labels.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([ident, "cat"] for _, ident in rows)
    r = run_cli("label", str(run), "--from", str(tmp_path / "labels.csv"))
    assert r.returncode == 0, r.stderr
    state = json.loads((run / "state.json").read_text())
    ids = json.loads((run / "pool" / "manifest.json").read_text())["pool"]
    assert sorted(ids[i] for i, k in enumerate(state["labeled_round"]) if k == 0) == sorted(ident for _, ident in rows)
    # the rest through the page's path (partial CSV -> Submit), which answered 409 forever for " leading.png"
    from alssl.api import opened
    from alssl.labeling.session import LabelSession

    r = run_cli("query", str(run), "--budget", "3", "--strategy", "random")
    assert r.returncode == 0, r.stderr
    with opened(run) as (run_obj, dataset):
        pass
    session = LabelSession(run, dataset, classes=["cat", "dog"])
    session.load(run_obj)
    for i in session.indices:
        assert session.set_label(i, "dog")[0] == 200
    status, res = session.submit()
    assert status == 200, res
    # and the last two through Label Studio: tasks.json (valid UTF-8 JSON) -> an export -> label --from
    r = run_cli("query", str(run), "--budget", "2", "--strategy", "random")
    assert r.returncode == 0, r.stderr
    r = run_cli("tasks", str(run), "--out", str(tmp_path / "ls"))
    assert r.returncode == 0, r.stderr
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_bytes().decode("utf-8"))
    for k, t in enumerate(tasks):
        t |= {"id": k + 1, "annotations": [{"id": k + 1, "result": [{"from_name": "label", "to_name": "image",
                                                                      "type": "choices",
                                                                      "value": {"choices": ["cat"]}}]}]}
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    r = run_cli("label", str(run), "--from", str(tmp_path / "export.json"))
    assert r.returncode == 0, r.stderr
    assert all(k >= 0 for k in json.loads((run / "state.json").read_text())["labeled_round"])
    from alssl.labeling.studio import local_files_url

    assert local_files_url(ODD_NAMES[-1]).endswith("caf%E9.png")


def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch):
    photos, run = tmp_path / "photos", tmp_path / "run"
    _photos(photos, 6)
    locked = photos / "b"

    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    r = run_cli("pretrain", "--data", str(photos), "--out", str(run), "--epochs", "0", "--image-size", "8", "-q")
    assert r.returncode == 0, r.stderr
    assert "warning: skipped 1 unreadable" in r.stderr and "b/" in r.stderr, r.stderr
    assert "b/,folder cannot be listed (PermissionError" in (run / "skipped.csv").read_text()


# ---------------------------------------------------------------- 7. label files and page requests of bad shapes
def _proper_task(run: Path) -> dict:
    i = json.loads((run / "state.json").read_text())["open_query"]["indices"][0]
    return {"id": 1, "data": {"alssl_index": i}, "annotations": [{"id": 1, "result": [
        {"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": ["1"]}}]}]}


LS_CASES = {
    "annotations-not-a-list": lambda run: json.dumps([_proper_task(run), {"id": 2, "data": {}, "annotations": 5}]),
    "result-not-a-list": lambda run: json.dumps([_proper_task(run), {"id": 2, "data": {"alssl_index": 0},
                                                                     "annotations": [{"id": 3, "result": 7}]}]),
    "data-a-list": lambda run: json.dumps([_proper_task(run), {"id": 2, "data": [1, 2], "annotations": []}]),
    "deep-nesting": lambda run: "[" * 200_000 + "]" * 200_000,
    "huge-index-csv": lambda run: "index,label\n" + "9" * 5000 + ",1\n",
    "huge-label-csv": lambda run: f"index,label\n{_proper_task(run)['data']['alssl_index']}," + "9" * 5000 + "\n",
}


@pytest.mark.parametrize("case", sorted(LS_CASES))
def test_label_files_of_bad_shapes(run_dir, tmp_path, case):
    text = LS_CASES[case](run_dir)
    path = tmp_path / ("labels.csv" if case.endswith("csv") else "export.json")
    path.write_text(text)
    check(run_dir, ["label", str(run_dir), "--from", str(path)], "label file")


def _asgi(app, method: str, path: str, body: bytes = b"") -> int:
    """The status of one request to an ASGI app, in-process (no server, no httpx)."""
    import asyncio

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"token=T",
             "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}
    pending, sent = [{"type": "http.request", "body": body, "more_body": False}], []

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_label_page_answers_4xx_to_deep_json_and_a_damaged_state(run_dir):
    from alssl.api import opened
    from alssl.labeling.server import make_app
    from alssl.labeling.session import LabelSession

    with opened(run_dir) as (run, dataset):
        pass
    session = LabelSession(run_dir, dataset, classes=dataset.classes)
    session.load(run)
    app = make_app(session, "T")
    assert _asgi(app, "GET", "/api/query") == 200
    assert _asgi(app, "POST", "/api/label", b"[" * 100_000 + b"]" * 100_000) == 400
    (run_dir / "state.json").write_text("{damaged")
    for method, path in (("GET", "/api/query"), ("POST", "/api/submit"), ("POST", "/api/next")):
        assert _asgi(app, method, path, b"{}") == 409, path
    i = session.indices[0]
    assert _asgi(app, "POST", "/api/label", json.dumps({"index": i, "label": "1"}).encode()) == 409


def test_damaged_probcover_cache_is_estimated_again(tmp_path):
    from alssl.acquisition.base import AcquisitionContext
    from alssl.acquisition.probcover import delta_cache_path, estimated_delta

    emb = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    ctx = AcquisitionContext(embeddings=emb, labeled=np.zeros(60, bool), labels=np.full(60, -1), num_classes=3,
                             cache_dir=tmp_path)
    xs = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    delta, how = estimated_delta(ctx, xs)
    for garbage in ("{not json", '{"delta": {"alpha=0.95,classes=3": "abc"}}', '{"delta": [1]}', "[1]"):
        delta_cache_path(tmp_path, emb).write_text(garbage)
        assert estimated_delta(ctx, xs) == (delta, "estimated")
    assert estimated_delta(ctx, xs) == (delta, "cached")


def test_label_csv_with_a_huge_first_line(run_dir, tmp_path):
    (tmp_path / "labels.csv").write_text("x" * 200_000 + "\n")
    check(run_dir, ["label", str(run_dir), "--from", str(tmp_path / "labels.csv")], "label file")
