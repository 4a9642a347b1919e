"""The unlabeled image-folder pool: decoding one file, scanning, the on-disk pool, change detection, classes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alssl.data import PoolReader, load_dataset
from alssl.data.folder import (DiskPool, build_pool, decode_files, folder_changes, parse_classes, resolve_classes,
                               scan_folder)
from alssl.data.images import load_image
from alssl.errors import UserError


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- one file
def test_resize_and_crop_match_torchvision(tmp_path):
    """Shorter side to S (bilinear) + centre crop: the same pixels as torchvision's Resize(S) + CenterCrop(S)."""
    from torchvision import transforms

    for i, (h, w) in enumerate([(48, 40), (150, 200), (37, 91), (24, 24)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rgb(h, w, i)).save(p)
        ref = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])(Image.open(p).convert("RGB"))
        assert np.array_equal(load_image(p, 32, 3), np.asarray(ref)), (h, w)


def test_modes_become_rgb_or_gray(tmp_path):
    base = rgb(20, 30)
    Image.fromarray(base).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(base).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "p.png")
    Image.fromarray(base).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(base).convert("LA").save(tmp_path / "la.png")
    Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16)).save(tmp_path / "i16.png")
    frames = [Image.fromarray(rgb(20, 30, s)) for s in (1, 2)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for name in ("rgba.png", "p.png", "cmyk.jpg", "la.png", "i16.png", "anim.gif"):
        a3, a1 = load_image(tmp_path / name, 16, 3), load_image(tmp_path / name, 16, 1)
        assert a3.shape == (16, 16, 3) and a1.shape == (16, 16, 1) and a3.dtype == np.uint8, name
    i16 = load_image(tmp_path / "i16.png", 16, 1)
    assert 0 < i16.mean() < 255 and i16.max() > 200  # 16-bit scaled to 0..255, not clipped to white
    frames[0].save(tmp_path / "first.gif")
    frames[1].save(tmp_path / "second.gif")
    gif = load_image(tmp_path / "anim.gif", 16, 3)
    assert np.array_equal(gif, load_image(tmp_path / "first.gif", 16, 3))  # the first frame, not the second
    assert not np.array_equal(gif, load_image(tmp_path / "second.gif", 16, 3))


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg", 20, 1)[..., 0]
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # displayed upright: the white half is on top


def test_jpeg_draft_decoding_is_close_to_a_full_decode(tmp_path):
    from torchvision import transforms

    big = np.asarray(Image.fromarray(rgb(60, 80)).resize((800, 600), Image.BICUBIC))
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    ref = np.asarray(transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32)])
                     (Image.open(tmp_path / "big.jpg")))
    diff = np.abs(load_image(tmp_path / "big.jpg", 32, 3).astype(int) - ref.astype(int))
    assert diff.mean() < 4  # the 1/8-scale DCT decode differs from full decode + resize by a few grey levels
    assert diff.max() > 0
    assert np.array_equal(load_image(tmp_path / "big.jpg", 32, 3, draft=False), ref)  # --no-jpeg-draft: exact


# ---------------------------------------------------------------- the pool
def make_pool(root: Path, n: int = 12, gray: bool = False) -> None:
    for i in range(n):
        d = root / ("a" if i % 2 else "b/c")
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(rgb(20 + i, 30, i))
        (im.convert("L") if gray else im).save(d / f"{i:02d}.{'PNG' if i % 3 else 'jpg'}")
    (root / "readme.txt").write_text("x")
    (root / ".hidden").mkdir()
    Image.fromarray(rgb(8, 8)).save(root / ".hidden" / "x.png")


def test_scan_is_recursive_sorted_and_skips_hidden_and_run_dirs(tmp_path):
    make_pool(tmp_path / "p")
    (tmp_path / "p" / "run").mkdir()
    for f in ("state.json", "run.toml", "x.png"):
        (tmp_path / "p" / "run" / f).write_text("")
    rels = [r[0] for r in scan_folder(tmp_path / "p")]
    assert rels == sorted(rels) and len(rels) == 12
    assert any(r.endswith(".PNG") for r in rels) and not any(r.startswith((".hidden", "run/")) for r in rels)


def test_pool_matches_serial_decoding_and_reads_like_an_array(tmp_path):
    make_pool(tmp_path / "p", n=300)
    (tmp_path / "p" / "bad.png").write_bytes(b"not a png")
    m = build_pool(tmp_path / "p", tmp_path / "pool", image_size=None, strict=False, workers=2, quiet=True)
    assert m["image_size"] == 64 and m["channels"] == 3  # images up to 319 px: default 64
    assert [s[0] for s in m["skipped"]] == ["bad.png"] and len(m["pool"]) == 300
    pool = DiskPool(tmp_path / "pool" / "pixels.npy")
    ref = np.load(tmp_path / "pool" / "pixels.npy")
    for i in (0, 17, 299):
        assert np.array_equal(pool[i], load_image(tmp_path / "p" / m["pool"][i], 64, 3))
    idx = np.array([5, 3, 4, 299, 3, 0])
    assert np.array_equal(pool[idx], ref[idx]) and np.array_equal(pool[10:20], ref[10:20])
    reader = PoolReader(pool)
    assert tuple(reader(np.array([2, 1])).shape) == (2, 3, 64, 64)


def test_default_size_32_and_gray_pool(tmp_path):
    make_pool(tmp_path / "p", n=6, gray=True)  # heights 20..25 ≤ 32
    m = build_pool(tmp_path / "p", tmp_path / "pool", image_size=None, strict=False, workers=1, quiet=True)
    assert (m["image_size"], m["channels"]) == (32, 1)
    ref = np.load(tmp_path / "pool" / "pixels.npy")
    # with --image-size there is no header pass: channels are found while decoding, with the same result
    m = build_pool(tmp_path / "p", tmp_path / "pool2", image_size=32, strict=False, workers=1, quiet=True)
    assert m["channels"] == 1 and np.array_equal(np.load(tmp_path / "pool2" / "pixels.npy"), ref)
    Image.fromarray(rgb(9, 9)).save(tmp_path / "p" / "colour.png")
    m = build_pool(tmp_path / "p", tmp_path / "pool3", image_size=32, strict=False, workers=1, quiet=True)
    assert m["channels"] == 3 and np.load(tmp_path / "pool3" / "pixels.npy").shape == (7, 32, 32, 3)


def test_strict_empty_and_all_corrupt(tmp_path):
    make_pool(tmp_path / "p", n=3)
    (tmp_path / "p" / "z.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"z.jpg cannot be read \(empty file.*--strict"):
        build_pool(tmp_path / "p", tmp_path / "pool", image_size=16, strict=True, workers=1, quiet=True)
    assert not (tmp_path / "pool").exists() and not (tmp_path / "pool.partial").exists()
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        build_pool(tmp_path / "e", tmp_path / "pool", image_size=16, strict=False, workers=1, quiet=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="none of the 1 images"):
        build_pool(tmp_path / "c", tmp_path / "pool", image_size=16, strict=False, workers=1, quiet=True)


def test_changed_folder_is_refused_and_a_deleted_pool_rebuilt(tmp_path):
    make_pool(tmp_path / "p")
    ds = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=16)
    assert ds.fresh and not ds.has_ground_truth and ds.x_train.shape == (12, 16, 16, 3)
    assert not load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=16).fresh  # reused
    expect = {"n": 12, "image_size": 16, "channels": 3}
    import shutil

    shutil.rmtree(tmp_path / "pool")
    again = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=16, expect=expect)
    assert again.fresh and np.array_equal(again.x_train[:], ds.x_train[:])
    Image.fromarray(rgb(9, 9)).save(tmp_path / "p" / "new.png")
    with pytest.raises(UserError, match=r"changed since this run's pool was built: 1 added \(new.png\)"):
        load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=16)
    old = scan_folder(tmp_path / "p")
    (tmp_path / "p" / "a" / "01.PNG").write_bytes(b"x" * 10)
    assert "1 modified (a/01.PNG)" in folder_changes(old, scan_folder(tmp_path / "p"))


def test_classes_and_test_folder(tmp_path):
    assert parse_classes("cat, dog,bird") == ["cat", "dog", "bird"]
    (tmp_path / "c.txt").write_text("# names\ncat\n\ndog\n")
    assert parse_classes(f"@{tmp_path / 'c.txt'}") == ["cat", "dog"]
    for bad, msg in [("cat,,dog", "empty name"), ("cat,cat", "repeats cat"), ("cat,__skip__", "none of these")]:
        with pytest.raises(UserError, match=msg):
            parse_classes(bad)
    for c in ("dog", "cat"):
        (tmp_path / "t" / c).mkdir(parents=True)
        Image.fromarray(rgb(10, 10)).save(tmp_path / "t" / c / "0.png")
    assert resolve_classes(None, tmp_path / "t") == ["cat", "dog"]
    assert resolve_classes(["dog", "cat", "bird"], tmp_path / "t") == ["dog", "cat", "bird"]
    with pytest.raises(UserError, match=r"class folder\(s\) cat that are not in --classes"):
        resolve_classes(["dog", "bird"], tmp_path / "t")
    make_pool(tmp_path / "p", n=4)
    ds = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", test=tmp_path / "t", classes=["dog", "cat"])
    assert ds.classes == ["dog", "cat"] and sorted(ds.y_test.tolist()) == [0, 1] and ds.x_test.shape[1:] == (32, 32, 3)


def test_decode_files_keeps_order_and_reports_bad_files(tmp_path):
    make_pool(tmp_path / "p", n=5)
    (tmp_path / "p" / "trunc.png").write_bytes((tmp_path / "p" / "a" / "01.PNG").read_bytes()[:60])
    rels = [r[0] for r in scan_folder(tmp_path / "p")]
    res = decode_files(tmp_path / "p", rels, dest=tmp_path / "x.npy", image_size=8, workers=1, label="t", quiet=True)
    assert res["kept"] == [r for r in rels if r != "trunc.png"] and res["skipped"][0][0] == "trunc.png"
    assert np.load(tmp_path / "x.npy").shape == (5, 8, 8, 3)


# ---------------------------------------------------------------- JPEG pool storage (issue 28)
def make_photos(root: Path, n: int, gray_every: int = 0) -> None:
    """Smooth photo-like images 100×80 (noise upscaled), PNG and JPEG, some grayscale."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.fromarray(rgb(12, 16, i)).resize((100 + i, 80), Image.BICUBIC)
        im = im.convert("L") if gray_every and i % gray_every == 0 else im
        im.save(root / f"{i:02d}.{'png' if i % 2 else 'jpg'}", quality=95)


def test_jpeg_pool_above_64px_reads_back_close_to_raw(tmp_path):
    from alssl.data.folder import JpegPool

    make_photos(tmp_path / "p", 40, gray_every=5)
    (tmp_path / "p" / "bad.png").write_bytes(b"not a png")
    m = build_pool(tmp_path / "p", tmp_path / "pool", image_size=72, strict=False, workers=1, quiet=True)  # auto
    raw = build_pool(tmp_path / "p", tmp_path / "raw", image_size=72, strict=False, workers=1, quiet=True,
                     pool_format="raw")
    assert (m["pool_format"], m["jpeg_quality"], raw["pool_format"]) == ("jpeg", 90, "raw")
    assert m["pool"] == raw["pool"] and len(m["pool"]) == 40 and [s[0] for s in m["skipped"]] == ["bad.png"]
    assert m["content_sha256"] == raw["content_sha256"] and not (tmp_path / "pool" / "pixels.npy").exists()
    pool, ref = JpegPool(tmp_path / "pool", 40, 72, 3), np.load(tmp_path / "raw" / "pixels.npy")
    x = pool[:]
    assert pool.shape == x.shape == (40, 72, 72, 3) and x.dtype == np.uint8
    diff = np.abs(x.astype(int) - ref.astype(int))
    assert 0 < diff.mean() < 5  # lossy: ~3.4 grey levels on these colour-noise images (another image: ~80)
    assert (x[::5, ..., 0] == x[::5, ..., 2]).all()  # the gray files stay gray (1-channel JPEGs repeated to RGB)
    idx = np.array([5, 3, 4, 39, 3, 0, -1])
    assert np.array_equal(pool[idx], x[idx]) and np.array_equal(pool[10:20], x[10:20])
    assert np.array_equal(pool[7], x[7]) and np.array_equal(pool[-1], x[39]) and np.array_equal(pool[::7], x[::7])
    threaded, inline = (JpegPool(tmp_path / "pool", 40, 72, 3, threads=2),
                        JpegPool(tmp_path / "pool", 40, 72, 3, threads=1))
    assert np.array_equal(threaded[:], x) and np.array_equal(inline[:], x)  # decoding is deterministic
    assert tuple(PoolReader(pool)(np.array([2, 1])).shape) == (2, 3, 72, 72)
    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(pool))[idx], x[idx])  # for worker processes


def test_pool_format_override_and_gray_jpeg(tmp_path):
    make_photos(tmp_path / "p", 6, gray_every=1)  # every image grayscale
    for size, fmt, want in ((72, "raw", "raw"), (32, "jpeg", "jpeg"), (32, None, "raw"), (None, "jpeg", "jpeg")):
        ds = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / f"pool{size}{fmt}", image_size=size,
                          pool_format=fmt)
        assert ds.pool_identity["pool_format"] == want and ds.x_train[:].shape == (6, size or 64, size or 64, 1)
        assert json.loads((tmp_path / f"pool{size}{fmt}" / "manifest.json").read_text())["pool_format"] == want
    with pytest.raises(UserError, match='unknown pool format "jpg".*did you mean "jpeg"'):
        load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "bad", pool_format="jpg")
    with pytest.raises(UserError, match="--pool-format applies to an unlabeled image folder; digits is a labeled"):
        load_dataset("digits", pool_format="jpeg")


def test_pool_format_change_is_detected_and_a_rebuild_keeps_the_runs_format(tmp_path):
    import shutil

    make_photos(tmp_path / "p", 8)
    ds = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72)
    expect = {"n": 8, "image_size": 72, "channels": 3, **ds.pool_identity}
    assert expect["pool_format"] == "jpeg"
    jpegs = (tmp_path / "pool" / "pixels.jpegs").read_bytes()
    with pytest.raises(UserError, match=r"stored as jpeg \(not raw\); rerun with --pool-format jpeg"):
        load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72, pool_format="raw")
    build_pool(tmp_path / "p", tmp_path / "pool", image_size=72, strict=False, workers=1, quiet=True, pool_format="raw")
    with pytest.raises(UserError, match=r"not this run's pool \(its pixels are stored as raw, the run's as jpeg\)"):
        load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72, expect=expect)
    shutil.rmtree(tmp_path / "pool")  # the rebuild takes the run's format (not auto's), and the same bytes
    again = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72, expect=expect,
                         pool_format="raw")
    assert again.fresh and (tmp_path / "pool" / "pixels.jpegs").read_bytes() == jpegs
    old_run = {k: v for k, v in expect.items() if k != "pool_format"}  # a run made before formats: raw rows
    shutil.rmtree(tmp_path / "pool")
    old = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72, expect=old_run)
    assert old.pool_identity["pool_format"] == "raw" and (tmp_path / "pool" / "pixels.npy").is_file()


def test_interrupted_jpeg_build_leaves_no_pool_and_reruns(tmp_path, monkeypatch):
    from alssl.data import folder

    make_photos(tmp_path / "p", 8)
    (tmp_path / "pool.partial" / "pixels.jpegs.staging").mkdir(parents=True)  # what a kill -9 mid-build leaves
    (tmp_path / "pool.partial" / "pixels.jpegs.staging" / "000000000").write_bytes(b"half a chunk")

    def interrupted(parts, dest):
        raise KeyboardInterrupt

    monkeypatch.setattr(folder, "_join_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_pool(tmp_path / "p", tmp_path / "pool", image_size=72, strict=False, workers=1, quiet=True)
    assert not (tmp_path / "pool").exists() and not (tmp_path / "pool.partial").exists()
    monkeypatch.undo()
    (tmp_path / "pool.partial").mkdir()
    (tmp_path / "pool.partial" / "pixels.jpegs").write_bytes(b"stale")
    m = build_pool(tmp_path / "p", tmp_path / "pool", image_size=72, strict=False, workers=1, quiet=True)
    assert m["pool_format"] == "jpeg" and not (tmp_path / "pool.partial").exists()
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) \
            == ["manifest.json", "pixels-offsets.npy", "pixels.jpegs"]
    assert load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool").x_train[:].shape == (8, 72, 72, 3)


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "pixels.jpegs").write_bytes((d / "pixels.jpegs").read_bytes()[:-10]), "truncated"),
    (lambda d: np.save(d / "pixels-offsets.npy", np.zeros(3, np.int64)), "int64 [9] offsets"),
    (lambda d: (d / "pixels-offsets.npy").write_bytes(b"garbage"), "no .npy header"),
    (lambda d: (d / "pixels-offsets.npy").unlink(), "cannot read"),
])
def test_damaged_jpeg_pool_is_refused(tmp_path, damage, needle):
    make_photos(tmp_path / "p", 8)
    load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72)
    damage(tmp_path / "pool")
    with pytest.raises(UserError, match=f"{re.escape(needle)}.*delete {re.escape(str(tmp_path / 'pool'))} and rerun"):
        load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72)


def test_corrupt_jpeg_bytes_are_refused_on_read(tmp_path):
    make_photos(tmp_path / "p", 8)
    ds = load_dataset(str(tmp_path / "p"), pool_dir=tmp_path / "pool", image_size=72)
    with open(tmp_path / "pool" / "pixels.jpegs", "r+b") as f:
        f.write(b"\x00" * 64)  # image 0's header
    with pytest.raises(UserError, match=r"is damaged \(image 0 cannot be decoded.*and rerun to rebuild"):
        ds.x_train[0:3]
    assert ds.x_train[5].shape == (72, 72, 3)


def test_a_run_on_a_jpeg_pool_through_the_cli(tmp_path):
    """pretrain at 72 px (auto: JPEG) → the run records the format; another --pool-format is refused; a query embeds
    the JPEG pool, writes its contact sheet, and rebuilds a deleted pool in the run's format with the same bytes."""
    import shutil

    from conftest import run_cli_inprocess as run_cli
    from test_bad_inputs import assert_user_error

    make_photos(tmp_path / "p", 12)
    run = tmp_path / "run"
    r = run_cli("pretrain", "--data", str(tmp_path / "p"), "--out", str(run), "--image-size", "72",
                "--epochs", "0", "-q")
    assert r.returncode == 0, r.stderr
    data = json.loads((run / "state.json").read_text())["config"]["data"]
    assert data["pool_format"] == data["pool"]["pool_format"] == "jpeg" \
            and 'pool_format = "jpeg"' in (run / "run.toml").read_text()
    jpegs = (run / "pool" / "pixels.jpegs").read_bytes()
    assert_user_error(run_cli("pretrain", "--data", str(tmp_path / "p"), "--out", str(run), "--image-size", "72",
                              "--epochs", "0", "-q", "--pool-format", "raw"), "--pool-format jpeg (not raw)")
    shutil.rmtree(run / "pool")
    r = run_cli("query", str(run), "--budget", "3", "--strategy", "kcenter", "--thumbnails")
    assert r.returncode == 0, r.stderr
    assert (run / "pool" / "pixels.jpegs").read_bytes() == jpegs and list((run / "queries").glob("round-*.png"))
