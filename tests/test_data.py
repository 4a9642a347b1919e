"""Tests for alssl.data: the four SPECs, every validation error, long tail, normalisation."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alssl.data import (CIFAR10_CLASSES, Dataset, compute_mean_std, load_dataset, long_tail_counts, make_long_tail,
                        to_tensor)
from alssl.errors import UserError

SHARED = Path("/work/shared/data")


# ---------------------------------------------------------------- fixtures
def save_npz(path: Path, **arrays) -> str:
    base = dict(x_train=np.zeros((6, 4, 4), np.uint8), y_train=np.array([0, 1, 2, 0, 1, 2]),
                x_test=np.zeros((3, 4, 4), np.uint8), y_test=np.array([0, 1, 2]))
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})
    return str(path)


def write_folder(root: Path, layout: dict[str, dict[str, list]]) -> Path:
    """layout = {"train": {"cat": [array, ...]}, "test": {...}}; arrays saved as PNG 000.png, 001.png, ..."""
    for split, classes in layout.items():
        for cls, images in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, a in enumerate(images):
                Image.fromarray(a).save(root / split / cls / f"{i:03d}.png")
    return root


def _s(b: bytes) -> bytes:  # Python 2 str opcode (SHORT_BINSTRING / BINSTRING)
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _i(v: int) -> bytes:  # BININT
    return b"J" + struct.pack("<i", v)


def py2_batch(data: np.ndarray, labels) -> bytes:
    """A CIFAR-10 batch byte-for-byte as Python 2's cPickle (protocol 2) wrote the real files:
    str keys, a numpy uint8 array via numpy.core.multiarray._reconstruct, a list of int labels."""
    dtype = (b"cnumpy\ndtype\n" + _s(b"u1") + _i(0) + _i(1) + b"\x87R"
             + b"(" + _i(3) + _s(b"|") + b"NNN" + _i(-1) + _i(-1) + _i(0) + b"tb")
    arr = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + _i(0) + b"\x85" + _s(b"b") + b"\x87R"
           + b"(" + _i(1) + _i(data.shape[0]) + _i(data.shape[1]) + b"\x86" + dtype + b"\x89" + _s(data.tobytes())
           + b"tb")
    lab = b"](" + b"".join(_i(int(v)) for v in labels) + b"e"
    return b"\x80\x02}(" + _s(b"batch_label") + _s(b"batch") + _s(b"data") + arr + _s(b"labels") + lab + b"u."


def write_cifar(root: Path, n: int = 4, meta: bool = True, py3: bool = False) -> dict:
    """Five train batches + test_batch (+ batches.meta) in the real layout; returns the raw rows/labels."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    raw = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()
        raw[name] = (rows, labels)
        blob = (pickle.dumps({b"batch_label": b"b", b"data": rows, b"labels": labels}, protocol=5) if py3
                else py2_batch(rows, labels))
        (root / name).write_bytes(blob)
    if meta:
        names = [b"plane", b"car"] + [f"c{i}".encode() for i in range(2, 10)]
        (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=4))
    return raw


# ---------------------------------------------------------------- digits
def test_digits_shape_and_fixed_split():
    d = load_dataset("digits")
    assert d.x_train.shape == (1437, 8, 8, 1) and d.x_test.shape == (360, 8, 8, 1)
    assert d.x_train.dtype == np.uint8 and d.y_train.dtype == np.int64
    assert d.x_train.max() == 255 and d.classes == [str(i) for i in range(10)]
    assert (d.num_classes, d.channels, d.image_size, d.hw) == (10, 1, 8, (8, 8))
    assert d.ids[:2] == ["train/0", "train/1"] and len(d.ids) == 1437 and d.name == "digits"
    assert np.bincount(d.y_test).min() >= 35  # stratified: every class ~36 test samples
    other = load_dataset("digits", seed=7)
    assert np.array_equal(d.x_train, other.x_train) and np.array_equal(d.y_test, other.y_test)


# ---------------------------------------------------------------- npz
@pytest.mark.skipif(not (SHARED / "cifar10_10k.npz").exists(), reason="shared data missing")
def test_npz_cifar10_10k():
    d = load_dataset(str(SHARED / "cifar10_10k.npz"))
    assert d.x_train.shape == (10000, 32, 32, 3) and d.classes == CIFAR10_CLASSES
    assert np.allclose(d.mean, (0.491, 0.483, 0.447), atol=0.002)
    assert all(0.2 < s < 0.3 for s in d.std)


@pytest.mark.skipif(not (SHARED / "mnist_10k.npz").exists(), reason="shared data missing")
def test_npz_mnist_3d_becomes_one_channel():
    d = load_dataset(str(SHARED / "mnist_10k.npz"))
    assert d.x_train.shape == (10000, 28, 28, 1) and d.channels == 1 and d.num_classes == 10


def test_npz_classes_default_span_both_splits(tmp_path):
    spec = save_npz(tmp_path / "d.npz", y_test=np.array([0, 4, 1]), x_train=np.full((6, 4, 4, 3), 51, np.uint8),
                    x_test=np.zeros((3, 4, 4, 3), np.uint8))
    d = load_dataset(spec)
    assert d.classes == ["0", "1", "2", "3", "4"] and d.x_train.shape == (6, 4, 4, 3)
    assert d.mean == pytest.approx((0.2, 0.2, 0.2)) and d.std == (1e-3, 1e-3, 1e-3)  # constant images: std floored


def test_npz_named_classes(tmp_path):
    d = load_dataset(save_npz(tmp_path / "d.npz", classes=np.array(["a", "b", "c"])))
    assert d.classes == ["a", "b", "c"]


# ---------------------------------------------------------------- ImageFolder
def test_image_folder_ids_classes_pixels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(5)]
    root = write_folder(tmp_path / "f", {"train": {"dog": imgs[:2], "cat": imgs[2:4]}, "test": {"cat": imgs[4:]}})
    (root / "train" / "cat" / "notes.txt").write_text("ignored")
    d = load_dataset(str(root) + "/")
    assert d.classes == ["cat", "dog"] and d.hw == (5, 6) and d.channels == 3
    assert d.ids == ["train/cat/000.png", "train/cat/001.png", "train/dog/000.png", "train/dog/001.png"]
    assert d.y_train.tolist() == [0, 0, 1, 1] and d.y_test.tolist() == [0]
    assert np.array_equal(d.x_train[2], imgs[0]) and np.array_equal(d.x_test[0], imgs[4])


def test_image_folder_grayscale_and_mixed(tmp_path):
    g = [np.full((4, 4), v, np.uint8) for v in (10, 20, 30)]
    d = load_dataset(str(write_folder(tmp_path / "g", {"train": {"a": g[:2]}, "test": {"a": g[2:]}})))
    assert d.x_train.shape == (2, 4, 4, 1) and d.x_train[1, 0, 0, 0] == 20
    rgb = np.full((4, 4, 3), 7, np.uint8)
    d = load_dataset(str(write_folder(tmp_path / "m", {"train": {"a": [g[0], rgb]}, "test": {"a": [g[2]]}})))
    assert d.x_train.shape == (2, 4, 4, 3) and d.x_train[0, 0, 0].tolist() == [10, 10, 10]  # gray promoted to RGB


# ---------------------------------------------------------------- cifar10 batches
@pytest.mark.parametrize("py3", [False, True])
def test_cifar10_batches(tmp_path, py3):
    raw = write_cifar(tmp_path / "c", py3=py3)
    d = load_dataset(f"cifar10:{tmp_path / 'c'}")
    assert d.x_train.shape == (20, 32, 32, 3) and d.x_test.shape == (4, 32, 32, 3)
    rows, labels = raw["data_batch_2"]
    assert d.y_train[4:8].tolist() == labels
    # row layout is 1024 R, 1024 G, 1024 B, row-major: pixel (y=1, x=2) of channel c is row[c*1024 + 32 + 2]
    assert d.x_train[4, 1, 2].tolist() == [rows[0, c * 1024 + 34] for c in range(3)]
    assert d.classes[:3] == ["plane", "car", "c2"] and d.ids[5] == "train/5"


def test_cifar10_without_meta_uses_cifar10_names(tmp_path):
    write_cifar(tmp_path / "c", meta=False)
    assert load_dataset(f"cifar10:{tmp_path / 'c'}").classes == CIFAR10_CLASSES


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("where", ["data_batch_1", "test_batch", "batches.meta"])
def test_cifar10_malicious_pickle_refused(tmp_path, where):
    write_cifar(tmp_path / "c")
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, Evil(marker)], b"label_names": [b"a"]}
    (tmp_path / "c" / where).write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UserError, match=r"cannot read .* CIFAR-10 python batch .*refusing to load global .*system"):
        load_dataset(f"cifar10:{tmp_path / 'c'}")
    assert not marker.exists()
    pickle.loads(pickle.dumps(Evil(marker)))  # sanity: the payload really runs when unpickled normally
    assert marker.exists()


# ---------------------------------------------------------------- errors: every one a UserError naming the fix
NPZ_ERRORS = {
    "missing key": (dict(y_test=None), r"missing keys y_test; an .npz dataset needs x_train, y_train, x_test, y_test"),
    "length": (dict(y_train=np.array([0, 1, 2, 0, 1])), r"x_train has 6 images but y_train has 5 labels"),
    "empty train": (dict(x_train=np.zeros((0, 4, 4), np.uint8), y_train=np.zeros(0, np.int64)),
                    r"the train split is empty"),
    "empty test": (dict(x_test=np.zeros((0, 4, 4), np.uint8), y_test=np.zeros(0, np.int64)),
                   r"the test split is empty"),
    "label range": (dict(classes=np.array(["a", "b"])), r"y_train has labels outside 0..1 \(found 2\)"),
    "negative": (dict(y_test=np.array([0, -1, 2])), r"y_test has labels outside 0..2 \(found -1\); labels must be"),
    "float labels": (dict(y_train=np.array([0.0, 1, 2, 0, 1, 2])),
                     r"y_train must hold integer class ids \(got float64\)"),
    "nan images": (dict(x_train=np.full((6, 4, 4), np.nan)),
                   r"x_train must be uint8 images \(got float64 with NaN values\); save 0..255"),
    "float images": (dict(x_test=np.zeros((3, 4, 4), np.float32)), r"x_test must be uint8 images \(got float32\)"),
    "dims": (dict(x_train=np.zeros((6, 16), np.uint8)), r"x_train must be N×H×W or N×H×W×C images \(got shape"),
    "channels": (dict(x_train=np.zeros((6, 4, 4, 4), np.uint8)), r"x_train has 4 channels .* use 1 \(grayscale\) or 3"),
    "nchw": (dict(x_test=np.zeros((3, 3, 4, 4), np.uint8)), r"transpose N×C×H×W with x.transpose\(0, 2, 3, 1\)"),
    "size": (dict(x_test=np.zeros((3, 5, 5), np.uint8)), r"test images are 5×5×1 but train images are 4×4×1"),
    "dup classes": (dict(classes=np.array(["a", "a", "b"])), r"class names repeat"),
}


@pytest.mark.parametrize("case", NPZ_ERRORS)
def test_npz_errors(tmp_path, case):
    arrays, pattern = NPZ_ERRORS[case]
    with pytest.raises(UserError, match=pattern):
        load_dataset(save_npz(tmp_path / "d.npz", **arrays))


def test_npz_unreadable(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    good = Path(save_npz(tmp_path / "good.npz")).read_bytes()
    (tmp_path / "trunc.npz").write_bytes(good[: len(good) // 2])
    np.save(tmp_path / "one.npy", np.zeros(3))
    os.replace(tmp_path / "one.npy", tmp_path / "one.npz")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros(1), y_test=np.zeros(1))
    (tmp_path / "empty.npz").write_bytes(b"")
    for name in ("junk", "trunc", "obj", "empty"):
        with pytest.raises(UserError, match=rf"cannot read .*{name}.npz as .npz .*; re-save it with np.savez"):
            load_dataset(str(tmp_path / f"{name}.npz"))
    with pytest.raises(UserError, match=r"holds a single array, not an .npz archive"):
        load_dataset(str(tmp_path / "one.npz"))


@pytest.mark.parametrize("spec, pattern", [
    ("missing.npz", r"no such file: missing.npz; pass an existing .npz file"),
    ("no/such/dir/", r"no such file or directory: no/such/dir/; valid SPECs: digits, FILE.npz"),
    ("digit", r'unknown dataset "digit" \(did you mean "digits"\?\); valid SPECs'),
    ("cifar10", r'did you mean "cifar10:DIR"'),
    ("cifar10:/no/such", r"no such directory: /no/such; cifar10:DIR needs"),
])
def test_spec_errors(spec, pattern):
    with pytest.raises(UserError, match=pattern):
        load_dataset(spec)


def test_image_folder_errors(tmp_path):
    a, b = np.zeros((4, 4, 3), np.uint8), np.zeros((5, 5, 3), np.uint8)
    cases = {
        "mixed": ({"train": {"x": [a, b]}, "test": {"x": [a]}}, r"train/x/001.png is 5×5 but train/x/000.png is 4×4"),
        "testsize": ({"train": {"x": [a]}, "test": {"x": [b]}}, r"test images are 5×5 but train images are 4×4"),
        "extra": ({"train": {"x": [a]}, "test": {"x": [a], "y": [a]}}, r"classes not in train/: y; test classes must"),
        "empty": ({"train": {"x": []}, "test": {"x": [a]}}, r"train holds no images \(.png/.jpg/.jpeg/.bmp\)"),
    }
    for name, (layout, pattern) in cases.items():
        with pytest.raises(UserError, match=pattern):
            load_dataset(str(write_folder(tmp_path / name, layout)))
    root = write_folder(tmp_path / "bad", {"train": {"x": [a, a]}, "test": {"x": [a]}})
    (root / "train" / "x" / "000.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UserError, match=r"cannot read image .*000.png .*; replace or delete it"):
        load_dataset(str(root))
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    root = write_folder(tmp_path / "trunc", {"train": {"x": [noise]}, "test": {"x": [noise]}})
    png = (root / "train" / "x" / "000.png").read_bytes()
    (root / "train" / "x" / "000.png").write_bytes(png[: len(png) // 2])  # truncated mid-pixels
    with pytest.raises(UserError, match=r"cannot read image .*000.png \(OSError: image file is truncated"):
        load_dataset(str(root))
    # a folder without both train/ and test/ is an unlabeled image pool (used through a run dir), with a warning
    # when it looks like half of the benchmark layout
    write_folder(tmp_path / "notest", {"train": {"x": [a]}})
    with pytest.raises(UserError, match=r"is an unlabeled image folder: it is used through a run dir"):
        load_dataset(str(tmp_path / "notest"))


def test_cifar10_errors(tmp_path):
    root = tmp_path / "c"
    write_cifar(root)
    spec = f"cifar10:{root}"
    (root / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(UserError, match=r"cannot read .*test_batch as a CIFAR-10 python batch .*replace it"):
        load_dataset(spec)
    blob = py2_batch(np.zeros((2, 3072), np.uint8), [0, 1])
    (root / "test_batch").write_bytes(blob[:100])  # truncated
    with pytest.raises(UserError, match=r"cannot read .*test_batch"):
        load_dataset(spec)
    (root / "test_batch").write_bytes(py2_batch(np.zeros((2, 1024), np.uint8), [0, 1]))
    with pytest.raises(UserError, match=r"data must be uint8 rows of 3072 bytes \(got uint8 \(2, 1024\)\)"):
        load_dataset(spec)
    (root / "test_batch").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match=r"is not a CIFAR-10 batch"):
        load_dataset(spec)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(UserError, match=r"lacks keys data/labels"):
        load_dataset(spec)
    (root / "test_batch").write_bytes(py2_batch(np.zeros((2, 3072), np.uint8), [0, 10]))
    with pytest.raises(UserError, match=r"y_test has labels outside 0..9 \(found 10\)"):
        load_dataset(spec)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": None}))
    with pytest.raises(UserError, match=r"labels must be a list of 2 integer class ids \(got None\)"):
        load_dataset(spec)
    (root / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"missing data_batch_3; cifar10:DIR needs data_batch_1"):
        load_dataset(spec)


# ---------------------------------------------------------------- long tail
def test_long_tail_counts():
    assert long_tail_counts(1000, 10, 100) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    assert long_tail_counts(5000, 10, 1) == [5000] * 10
    assert long_tail_counts(10, 3, 1000) == [10, 1, 1]  # at least one sample per class
    assert long_tail_counts(7, 1, 10) == [7]


def test_make_long_tail():
    y = np.repeat(np.arange(4), [50, 40, 60, 45])
    keep = make_long_tail(y, 8.0, np.random.default_rng(0))
    assert np.all(np.diff(keep) > 0)  # sorted, unique
    assert np.bincount(y[keep]).tolist() == long_tail_counts(40, 4, 8.0) == [40, 20, 10, 5]


def test_imbalance_via_load_dataset():
    base = load_dataset("digits")
    d = load_dataset("digits", imbalance=10, seed=3)
    n_max = np.bincount(base.y_train).min()
    assert np.bincount(d.y_train, minlength=10).tolist() == long_tail_counts(n_max, 10, 10)
    assert np.array_equal(d.x_test, base.x_test) and np.array_equal(d.y_test, base.y_test)  # test stays balanced
    orig = np.array([int(i.split("/")[1]) for i in d.ids])  # ids keep the original indices
    assert np.array_equal(d.x_train, base.x_train[orig]) and np.array_equal(d.y_train, base.y_train[orig])
    assert d.mean == compute_mean_std(d.x_train)[0]  # stats from the long-tailed pool
    assert load_dataset("digits", imbalance=10, seed=3).ids == d.ids
    assert load_dataset("digits", imbalance=10, seed=4).ids != d.ids
    for bad in (0.5, float("nan"), -2):
        with pytest.raises(UserError, match=r"--imbalance must be a number >= 1"):
            load_dataset("digits", imbalance=bad)


# ---------------------------------------------------------------- normalisation
def test_compute_mean_std_matches_numpy():
    x = np.random.default_rng(0).integers(0, 256, (7, 3, 5, 3), dtype=np.uint8)
    mean, std = compute_mean_std(x, chunk=3)
    ref = x.astype(np.float64) / 255
    assert np.allclose(mean, ref.mean((0, 1, 2))) and np.allclose(std, ref.std((0, 1, 2)))


def test_to_tensor():
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    t = to_tensor(x, mean, std)
    ref = (x.astype(np.float64) / 255 - np.array(mean)) / np.array(std)  # [N, H, W, C]
    assert t.dtype == torch.float32 and t.shape == (2, 3, 3, 4) and t.is_contiguous()
    assert np.allclose(t.numpy(), ref.transpose(0, 3, 1, 2), atol=1e-5)
    d = load_dataset("digits")
    t = to_tensor(d.x_train, d.mean, d.std)
    assert t.mean((0, 2, 3)).abs().max() < 1e-4 and (t.std((0, 2, 3)) - 1).abs().max() < 1e-3


def test_dataset_defaults():
    x = np.zeros((3, 2, 2, 1), np.uint8)
    d = Dataset(x_train=x, y_train=np.zeros(3, np.int64), x_test=x, y_test=np.zeros(3, np.int64), classes=["a"])
    assert d.ids == ["train/0", "train/1", "train/2"] and d.mean == (0.0,) and d.std == (1e-3,)


def test_npz_too_large_for_memory_is_a_user_error(tmp_path):
    """An .npz whose x_train claims 10 TB: numpy cannot allocate it, and the user gets one error naming the fix."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": (10**7, 1000, 1000)})
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x_train.npy", buf.getvalue() + b"\0" * 64)
        for k, a in (("y_train", np.zeros(3, np.int64)), ("x_test", np.zeros((1, 2, 2), np.uint8)),
                     ("y_test", np.zeros(1, np.int64))):
            b = io.BytesIO()
            np.save(b, a)
            z.writestr(f"{k}.npy", b.getvalue())
    with pytest.raises(UserError, match=r"does not fit in this machine's memory .*on-disk pool"):
        load_dataset(str(path))
