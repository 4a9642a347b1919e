"""Your own photos in, a usable model out: the whole path through the real CLI on a folder of 1,000+ mixed files.

The folder (tests/photo_folder.py) is CIFAR-10 images saved at 7 sizes (24×24 .. 200×150), as JPEG / PNG / WebP in
modes L, RGB, RGBA and P, in nested folders, with names that need CSV quoting, 3 corrupt files and a text file; plus a
labeled test folder. pretrain → query → label (by relative path and class name) → probe → export → predict, and the
exported TorchScript, run in a process that never imports alssl, predicts what `alssl predict` wrote."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli, run_cli_inprocess, snapshot
from photo_folder import make_photo_folder, make_test_folder
from test_bad_inputs import assert_user_error

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("photos")
    truth = make_photo_folder(root / "photos", 1000)
    make_test_folder(root / "test", 300)
    return {"root": root, "pool": root / "photos", "test": root / "test", "truth": truth}


@pytest.fixture(scope="module")
def labeled_run(photos) -> Path:
    """A run on the photo folder: pretrained 1 epoch, one round of 40 labels imported by path and class name."""
    run = photos["root"] / "run"
    r = run_cli("pretrain", "--data", str(photos["pool"]), "--test", str(photos["test"]), "--out", str(run),
                "--epochs", "1", "--batch-size", "128", "--image-size", "32", "-q")
    assert r.returncode == 0, r.stderr
    warnings = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 3 unreadable image file(s)"), r.stderr
    skipped = list(csv.reader((run / "skipped.csv").open()))
    assert skipped[0] == ["path", "reason"] and sorted(s[0] for s in skipped[1:]) == [
        "broken/empty.jpg", "broken/noise.png", "broken/truncated.png"]
    r = run_cli("query", str(run), "--budget", "40", "--strategy", "random")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(r.stdout.strip())))
    assert len(rows) == 40 and all(row["id"] in photos["truth"] for row in rows)
    labels = photos["root"] / "labels.csv"
    with labels.open("w", newline="") as f:  # the person's file: relative paths and class names
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([row["id"], photos["truth"][row["id"]]] for row in rows)
    r = run_cli("label", str(run), "--from", str(labels))
    assert r.returncode == 0 and "imported 40 labels" in r.stdout, r.stderr
    return run


def test_pool_was_decoded_once_with_every_good_file(labeled_run, photos):
    manifest = json.loads((labeled_run / "pool" / "manifest.json").read_text())
    assert len(manifest["pool"]) == 1000 and manifest["image_size"] == 32 and manifest["channels"] == 3
    assert set(manifest["pool"]) == set(photos["truth"])
    status = json.loads(run_cli_inprocess("status", str(labeled_run), "--json").stdout)
    assert status["pool"] == 1000 and status["skipped"] == 3 and status["labeled"] == 40


def test_probe_export_predict_and_torchscript_without_alssl(labeled_run, photos):
    run, root = labeled_run, photos["root"]
    r = run_cli_inprocess("probe", str(run))
    assert r.returncode == 0, r.stderr
    probe = json.loads(r.stdout)
    assert probe["n_labeled"] == 40 and 0.0 <= probe["accuracy"] <= 1.0
    r = run_cli_inprocess("export", str(run), "--out", str(root / "model"))
    assert r.returncode == 0, r.stderr
    card = json.loads((root / "model" / "model.json").read_text())
    assert card["classifier"] == "linear-probe" and card["accuracy"] == probe["accuracy"]
    assert card["classes"][:2] == ["airplane", "automobile"] and card["image_size"] == 32 and card["channels"] == 3
    r = run_cli_inprocess("predict", str(run), "--data", str(photos["test"]), "--out", str(root / "pred.csv"), "-q")
    assert r.returncode == 0, r.stderr
    pred = list(csv.DictReader((root / "pred.csv").open()))
    assert len(pred) == 300 and set(pred[0]) >= {"path", "label", "confidence"}
    truth = {p["path"]: Path(p["path"]).parent.name for p in pred}
    acc = sum(p["label"] == truth[p["path"]] for p in pred) / len(pred)
    assert round(acc, 4) == probe["accuracy"]  # the exported model predicts what the probe measured

    script = textwrap.dedent(f"""
        import csv, math, sys
        import numpy as np, torch
        from PIL import Image, ImageOps

        def load(path, size):  # the recipe in docs/export.md / model.json "preprocessing"
            im = Image.open(path)
            w, h = im.size
            if im.format == "JPEG" and min(w, h) >= 2 * size:
                s = min(w, h)
                im.draft("L" if im.mode == "L" else "RGB", (math.ceil(w * size / s), math.ceil(h * size / s)))
            im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            im = im.convert("RGB")
            w, h = im.size
            nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
            im = im.resize((nw, nh), Image.BILINEAR) if (nw, nh) != (w, h) else im
            left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
            return np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0

        model = torch.jit.load({str(root / 'model' / 'model.ts')!r})
        rows = list(csv.DictReader(open({str(root / 'pred.csv')!r})))
        x = torch.from_numpy(np.stack([load(r["path"], 32) for r in rows])).permute(0, 3, 1, 2)
        classes = {card['classes']!r}
        with torch.no_grad():
            labels = [classes[k] for k in model(x).argmax(1).tolist()]
        same = sum(a == r["label"] for a, r in zip(labels, rows))
        assert not any(m == "alssl" or m.startswith("alssl.") for m in sys.modules), "alssl was imported"
        print(same, len(rows))
    """)
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    same, n = map(int, out.stdout.split())
    assert same == n == 300


def test_predict_pool_and_import_labels_for_any_images(labeled_run, photos, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(labeled_run, run)
    r = run_cli_inprocess("predict", str(run), "--pool", "--out", str(tmp_path / "pool.csv"))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "pool.csv").open()))
    assert len(rows) == 960 and {"path", "label", "confidence", "index"} <= set(rows[0])
    assert any("," in row["path"] for row in rows)  # quoted names survive the round trip
    have = [row["path"] for row in rows[:25]]
    with (tmp_path / "have.csv").open("w", newline="") as f:  # labels the team already had, by path and class name
        w = csv.writer(f)
        w.writerow(["id", "label"])
        w.writerows([p, photos["truth"][p]] for p in have)
    r = run_cli_inprocess("label", str(run), "--from", str(tmp_path / "have.csv"), "--any")
    assert r.returncode == 0 and "imported 25 labels; 65 labeled in 2 rounds" in r.stdout, r.stderr
    rounds = json.loads((run / "state.json").read_text())["rounds"]
    assert rounds[-1]["strategy"] == "import" and rounds[-1]["n"] == 25


# ---------------------------------------------------------------- bad inputs: exit 2, one error line, nothing written
def _refused(args: list[str], where: Path, *needles: str) -> None:
    before = snapshot(where) if where.exists() else None
    assert_user_error(run_cli_inprocess(*args), *needles)  # the real entry point, in this process (no 3 s import)
    assert (snapshot(where) if where.exists() else None) == before


def test_bad_pool_inputs_leave_nothing(photos, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    _refused(["pretrain", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r1"), "--epochs", "0"],
             tmp_path / "r1", "holds no images")
    assert not (tmp_path / "r1").exists()
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    _refused(["pretrain", "--data", str(tmp_path / "junk"), "--out", str(tmp_path / "r2"), "--epochs", "0"],
             tmp_path / "r2", "none of the 3 images")
    small = tmp_path / "small"
    make_photo_folder(small, 30, corrupt=1)
    _refused(["pretrain", "--data", str(small), "--out", str(tmp_path / "r3"), "--epochs", "0", "--strict"],
             tmp_path / "r3", "broken/empty.jpg cannot be read", "--strict")
    _refused(["pretrain", "--data", str(small), "--out", str(tmp_path / "r4"), "--epochs", "0", "--test",
              str(photos["test"]), "--classes", "cat,dog"], tmp_path / "r4", "not in --classes")
    _refused(["pretrain", "--data", str(small), "--out", str(tmp_path / "r5"), "--epochs", "0", "--image-size", "0"],
             tmp_path / "r5", "--image-size")
    for r in ("r1", "r2", "r3", "r4", "r5"):
        assert not (tmp_path / r).exists(), r


def test_bad_inputs_on_an_existing_pool_run(photos, tmp_path):
    small = tmp_path / "small"
    make_photo_folder(small, 40, corrupt=0)
    run = tmp_path / "run"
    r = run_cli_inprocess("pretrain", "--data", str(small), "--out", str(run), "--epochs", "0",
                          "--classes", "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck")
    assert r.returncode == 0, r.stderr
    _refused(["predict", str(run), "--data", str(small), "--out", str(tmp_path / "p.csv")], run, "no labels yet")
    _refused(["export", str(run), "--out", str(tmp_path / "m")], run, "no labels yet")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m").exists()
    _refused(["label", str(run), "--oracle"], run, "unlabeled pool with no ground truth")
    q = run_cli_inprocess("query", str(run), "--budget", "5")
    assert q.returncode == 0, q.stderr
    (tmp_path / "l.csv").write_text("id,label\nnot/in/pool.jpg,cat\n")
    _refused(["label", str(run), "--from", str(tmp_path / "l.csv")], run,
             "'not/in/pool.jpg' is not an image of the pool")
    first = list(csv.DictReader(open(q.stdout.strip())))[0]["id"]
    (tmp_path / "l.csv").write_text(f"id,label\n{first},kat\n")
    _refused(["label", str(run), "--from", str(tmp_path / "l.csv")], run,
             "unknown class 'kat' (did you mean \"cat\"?)", "airplane, automobile")
    _refused(["curve", "--data", str(small), "--out", str(tmp_path / "c"), "--strategies", "random", "--budgets", "5"],
             tmp_path / "c", "unlabeled image folder")
    (small / "trip" / "added.png").write_bytes((small / "img_00000.png").read_bytes())
    _refused(["probe", str(run)], run, "changed since this run's pool was built: 1 added (trip/added.png)")
