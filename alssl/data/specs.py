"""The four labeled benchmark SPECs: `digits` (scikit-learn, embedded), `FILE.npz`, `DIR/` (ImageFolder:
DIR/train/<class>/*.png and DIR/test/<class>/*), `cifar10:DIR` (CIFAR-10 python batches). Each becomes one validated
in-memory `Dataset`; every bad input is a one-line `UserError`.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from alssl.data import CIFAR10_CLASSES, Dataset
from alssl.errors import UserError

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp"}


# ---------------------------------------------------------------- validation
def _images(x, key: str, src: str) -> np.ndarray:
    """Check one image array; return it as uint8 [N, H, W, C]."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        nan = " with NaN values" if x.dtype.kind == "f" and np.isnan(x).any() else ""
        raise UserError(f"{src}: {key} must be uint8 images (got {x.dtype}{nan}); "
                        f"save 0..255 pixels with x.astype(np.uint8)")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or 0 in x.shape[1:3]:
        raise UserError(f"{src}: {key} must be N×H×W or N×H×W×C images (got shape {x.shape})")
    if x.shape[3] not in (1, 3):
        raise UserError(f"{src}: {key} has {x.shape[3]} channels (shape {x.shape}); use 1 (grayscale) or 3 (RGB), "
                        f"channels last (N×H×W×C: transpose N×C×H×W with x.transpose(0, 2, 3, 1))")
    return x


def _labels(y, key: str, n: int, src: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise UserError(f"{src}: {key} must hold integer class ids (got {y.dtype}); save them with y.astype(np.int64)")
    if y.ndim != 1:
        raise UserError(f"{src}: {key} must be 1-D (got shape {y.shape}); flatten it with y.ravel()")
    if len(y) != n:
        raise UserError(f"{src}: x_{key[2:]} has {n} images but {key} has {len(y)} labels; give one label per image")
    return y.astype(np.int64)


def _build(name: str, src: str, x_train, y_train, x_test, y_test, classes=None, ids=None) -> Dataset:
    """Validate raw arrays (the checks every SPEC shares) and build the Dataset."""
    x_train, x_test = _images(x_train, "x_train", src), _images(x_test, "x_test", src)
    y_train = _labels(y_train, "y_train", len(x_train), src)
    y_test = _labels(y_test, "y_test", len(x_test), src)
    for split, x in (("train", x_train), ("test", x_test)):
        if len(x) == 0:
            raise UserError(f"{src}: the {split} split is empty; it needs at least one image")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise UserError(f"{src}: test images are {'×'.join(map(str, x_test.shape[1:]))} but train images are "
                        f"{'×'.join(map(str, x_train.shape[1:]))}; both splits need the same H×W×C")
    if classes is None:
        classes = [str(i) for i in range(int(max(y_train.max(), y_test.max())) + 1)]
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise UserError(f"{src}: class names repeat ({classes}); give each class one unique name")
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        bad = y[(y < 0) | (y >= len(classes))]
        if len(bad):
            raise UserError(f"{src}: {key} has labels outside 0..{len(classes) - 1} (found {int(bad[0])}); "
                            f"labels must be class ids 0..C-1 for the {len(classes)} classes")
    return Dataset(x_train=np.ascontiguousarray(x_train), y_train=y_train, x_test=np.ascontiguousarray(x_test),
                   y_test=y_test, classes=classes, ids=ids, name=name)


# ---------------------------------------------------------------- the four SPECs
def load_digits() -> Dataset:
    """scikit-learn digits (8×8, 0..16 -> uint8), stratified 80/20 split fixed by random_state=0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * 255.0 / 16.0).astype(np.uint8)  # [1797, 8, 8]
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    return _build("digits", "digits", x_tr, y_tr, x_te, y_te, classes=[str(i) for i in range(10)])


def load_npz(spec: str, path: Path) -> Dataset:
    if not path.is_file():
        raise UserError(f"no such file: {path}; pass an existing .npz file with keys {', '.join(NPZ_KEYS)}")
    fix = f"re-save it with np.savez({path.name!r}, x_train=..., y_train=..., x_test=..., y_test=...)"
    try:
        f = np.load(path, allow_pickle=False)
        if not hasattr(f, "files"):
            raise UserError(f"{path} holds a single array, not an .npz archive; {fix}")
        with f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise UserError(f"{path} is missing keys {', '.join(missing)}; an .npz dataset needs "
                                f"{', '.join(NPZ_KEYS)} (and optionally classes)")
            arrays = {k: f[k] for k in (*NPZ_KEYS, "classes") if k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); {fix}") from None
    except MemoryError as e:  # an .npz is read into memory whole; numpy says how much it wanted
        raise UserError(f"{path} does not fit in this machine's memory ({str(e)[:120]}); save the images as files in a "
                        f"folder and use it as an on-disk pool (`--data FOLDER`)") from None
    classes = arrays.get("classes")
    if classes is not None and classes.ndim != 1:
        raise UserError(f"{path}: classes must be a 1-D array of names (got shape {classes.shape}); {fix}")
    return _build(spec, str(path), *(arrays[k] for k in NPZ_KEYS),
                  classes=None if classes is None else classes.tolist())


def load_image_folder(spec: str, root: Path) -> Dataset:
    """ImageFolder: classes = sorted subfolders of train/; test classes must be a subset; sorted files."""
    from PIL import Image

    layout = "an ImageFolder needs DIR/train/<class>/*.png and DIR/test/<class>/*.png"
    subdirs = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"{root} has no {split}/ folder; {layout}")
        subdirs[split] = sorted(d.name for d in (root / split).iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = subdirs["train"]
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders; {layout}")
    extra = sorted(set(subdirs["test"]) - set(classes))
    if extra:
        raise UserError(f"{root / 'test'} has classes not in train/: {', '.join(extra)}; "
                        f"test classes must be a subset of train classes")

    def read(split: str):
        images, labels, ids, first = [], [], [], None
        for label, c in enumerate(classes):
            folder = root / split / c
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS) if folder.is_dir() else []
            for p in files:
                rel = p.relative_to(root).as_posix()
                try:
                    with Image.open(p) as im:
                        im = im.convert("L" if im.mode in ("L", "1", "LA") else "RGB")
                        a = np.asarray(im, dtype=np.uint8)
                except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... on bad files
                    raise UserError(f"cannot read image {p} ({type(e).__name__}: {e}); replace or delete it") from None
                if first is not None and a.shape[:2] != first[1]:
                    raise UserError(f"{rel} is {a.shape[1]}×{a.shape[0]} but {first[0]} is "
                                    f"{first[1][1]}×{first[1][0]}; resize all images to one size")
                first = first or (rel, a.shape[:2])
                images.append(a[..., None] if a.ndim == 2 else a)
                labels.append(label)
                ids.append(rel)
        return images, labels, ids

    (xtr, ytr, ids), (xte, yte, _) = read("train"), read("test")
    for split, imgs in (("train", xtr), ("test", xte)):
        if not imgs:
            raise UserError(f"{root / split} holds no images (.png/.jpg/.jpeg/.bmp); {layout}")
    if xtr[0].shape[:2] != xte[0].shape[:2]:
        raise UserError(f"test images are {xte[0].shape[1]}×{xte[0].shape[0]} but train images are "
                        f"{xtr[0].shape[1]}×{xtr[0].shape[0]}; resize all images to one size")
    c = max(a.shape[2] for a in xtr + xte)  # a mix of grayscale and RGB becomes RGB

    def stack(imgs: list[np.ndarray]) -> np.ndarray:
        return np.stack([np.repeat(a, c // a.shape[2], axis=2) for a in imgs])  # [N, H, W, c]

    return _build(spec, str(root), stack(xtr), np.array(ytr), stack(xte), np.array(yte), classes, ids)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold: dicts, lists, bytes, numbers and numpy arrays; no other globals."""

    _reconstruct = np.zeros(1).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct, whatever numpy version
    _frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy.(_)core.numeric._frombuffer (pickle protocol 5)
    ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def load_cifar10(spec: str, root: Path) -> Dataset:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not root.is_dir():
        raise UserError(f"no such directory: {root}; cifar10:DIR needs the CIFAR-10 python batches "
                        f"({', '.join(names)}) in DIR")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise UserError(f"{root} is missing {', '.join(missing)}; cifar10:DIR needs {', '.join(names)} "
                        f"(extract cifar-10-python.tar.gz there)")

    def unpickle(path: Path) -> dict:
        try:
            with open(path, "rb") as f:
                d = _BatchUnpickler(f, encoding="bytes").load()
        except Exception as e:  # untrusted bytes: any failure to parse is bad input
            raise UserError(f"cannot read {path} as a CIFAR-10 python batch ({type(e).__name__}: {e}); "
                            f"replace it with the original file from cifar-10-python.tar.gz") from None
        if not isinstance(d, dict):
            raise UserError(f"{path} is not a CIFAR-10 batch (a pickled dict); replace it with the original file")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}

    def batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
        d = unpickle(path)
        if not {"data", "labels"} <= d.keys():
            raise UserError(f"{path} lacks keys data/labels; replace it with the original CIFAR-10 batch")
        x = np.asarray(d["data"])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
            raise UserError(f"{path}: data must be uint8 rows of 3072 bytes (got {x.dtype} {x.shape}); "
                            f"replace it with the original CIFAR-10 batch")
        y = np.asarray(d["labels"])
        if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
            raise UserError(f"{path}: labels must be a list of {len(x)} integer class ids "
                            f"(got {str(d['labels'])[:40]}); "
                            f"replace it with the original CIFAR-10 batch")
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y  # [N, 32, 32, 3]

    parts = [batch(root / n) for n in names[:5]]
    x_te, y_te = batch(root / "test_batch")
    classes = CIFAR10_CLASSES
    if (root / "batches.meta").is_file():
        meta = unpickle(root / "batches.meta").get("label_names")
        if not isinstance(meta, list) or not meta:
            raise UserError(f"{root / 'batches.meta'} has no label_names list; replace or delete it")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta]
    return _build(spec, str(root), np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                  x_te, y_te, classes=classes)
