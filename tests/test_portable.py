"""A run works from its own RUN/pool: the photos folder (and the test folder) renamed, every command that only reads
the pool still works, the model card carries no local path, and only a pool rebuild asks for the folder."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from conftest import run_cli_inprocess
from photo_folder import make_photo_folder, make_test_folder
from test_bad_inputs import assert_user_error

CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"


def _ok(*args: str) -> str:
    r = run_cli_inprocess(*args)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


def _label(run: Path, truth: dict[str, str], out: Path, skip: int = 0) -> None:
    """Label the open query by id from the ground truth; the first `skip` rows as none of these."""
    q = json.loads((run / "state.json").read_text())["open_query"]
    rows = list(csv.DictReader(open(run / q["file"])))
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([r["id"], "__skip__" if n < skip else truth[r["id"]]] for n, r in enumerate(rows))


def test_run_survives_a_renamed_photo_folder(tmp_path):
    truth = make_photo_folder(tmp_path / "photos", 48, corrupt=0)
    make_test_folder(tmp_path / "test", 20)
    run = tmp_path / "run"
    _ok("pretrain", "--data", str(tmp_path / "photos"), "--test", str(tmp_path / "test"), "--out", str(run),
        "--epochs", "0", "--image-size", "16", "--classes", CLASSES, "-q")
    _ok("query", str(run), "--budget", "12", "--strategy", "random")
    _label(run, truth, tmp_path / "l0.csv")
    _ok("label", str(run), "--from", str(tmp_path / "l0.csv"))
    (tmp_path / "photos").rename(tmp_path / "photos-moved")
    (tmp_path / "test").rename(tmp_path / "test-moved")

    assert json.loads(_ok("probe", str(run)))["n_labeled"] == 12  # the test split comes from RUN/pool/test.npz
    _ok("query", str(run), "--budget", "6", "--strategy", "random")
    _label(run, truth, tmp_path / "l1.csv", skip=1)
    assert "imported 5 labels and 1 skipped images" in _ok("label", str(run), "--from", str(tmp_path / "l1.csv"))
    status = json.loads(_ok("status", str(run), "--json"))
    assert status["labeled"] == 17 and len(status["skipped_images"]) == 1

    # the labeling page's API: pool pixels instead of the (gone) originals
    from alssl.api import opened
    from alssl.labeling.session import LabelSession

    _ok("query", str(run), "--budget", "3", "--strategy", "random")
    with opened(run) as (r, ds):
        pass
    out = json.loads(_ok("tasks", str(run), "--out", str(tmp_path / "ls")))  # Label Studio: PNGs of the pool pixels
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    assert out["n"] == 3 and all(t["data"]["image"].startswith("/data/local-files/?d=images/") for t in tasks)
    s = LabelSession(run, ds, classes=ds.classes)
    s.load(r)
    assert s.pool_root is None and s.image(s.indices[0])[1] == "image/png"
    for i in s.indices:
        assert s.set_label(i, "cat")[0] == 200
    status, res = s.submit()
    assert status == 200 and res["imported"] == 3, res
    assert json.loads((run / "state.json").read_text())["rounds"][-1]["source"] == "queries/round-2.partial.csv"

    _ok("export", str(run), "--out", str(tmp_path / "model"))
    card_text = (tmp_path / "model" / "model.json").read_text()
    assert str(tmp_path) not in card_text and json.loads(card_text)["data"] == "photos"
    _ok("predict", str(run), "--pool", "--out", str(tmp_path / "pool.csv"))
    assert len(list(csv.DictReader(open(tmp_path / "pool.csv")))) == 48 - 20

    # a copy of the run in another place works the same; only rebuilding its pool needs the folder
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, copy)
    assert json.loads(_ok("probe", str(copy)))["n_labeled"] == 20
    shutil.rmtree(copy / "pool")
    assert_user_error(run_cli_inprocess("probe", str(copy)), "rebuilding it needs the source folder")
    assert "--test" not in run_cli_inprocess("probe", str(copy)).stderr
    # a new run on a folder that is not there: says so (not "drop --test")
    assert_user_error(run_cli_inprocess("pretrain", "--data", str(tmp_path / "photos"), "--test",
                                        str(tmp_path / "test-moved"), "--out", str(tmp_path / "r2"), "--epochs", "0"),
                      "no such folder")
