"""Where the pixels come from, decided once: a SPEC in, one validated `Dataset` out.

SPECs (docs/data.md): the labeled benchmarks `digits`, `FILE.npz`, `DIR/` with `DIR/train/<class>/` and
`DIR/test/<class>/`, and `cifar10:DIR` are read into memory (`alssl.data.specs`); **any other folder is an unlabeled
pool** of images of any size and format, decoded once to an on-disk uint8 pool (`alssl.data.folder`), with an
optional labeled `--test` folder and `--classes`. Stages read pixels only through `Dataset.x_train[indices]` (an
array, a `DiskPool` or a `JpegPool`, all uint8 [N, S, S, C]) and `pool_reader`, so they never care which it is.
`imbalance=G` turns a labeled training split into a CIFAR-10-LT style long tail (Cao et al., LDAM,
arXiv:1906.07413; Cui et al., arXiv:1901.05555). Every bad input is a one-line `UserError`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from alssl.errors import UserError, suggest, warn

if TYPE_CHECKING:
    import torch

SPECS = ("digits, FILE.npz, DIR/ (labeled: DIR/train/<class>/ + DIR/test/<class>/), cifar10:DIR, "
         "or any other folder of images (an unlabeled pool)")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class Dataset:
    """Training pool uint8 [N, H, W, C] (C = 1 or 3; an array or an on-disk `DiskPool` / `JpegPool`), optional labels.

    `y_train` is None for an unlabeled pool (no ground truth: no oracle, no curves); `x_test`/`y_test` are None
    when there is no labeled test set. `ids[i]` names pool sample i (the file path relative to the pool folder,
    or `train/<i>`)."""

    x_train: Any
    y_train: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    classes: list[str]
    ids: list[str] | None = None  # None -> "train/<i>"
    mean: tuple[float, ...] | None = None  # None -> computed from x_train
    std: tuple[float, ...] | None = None
    name: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files (path, reason), folder pools
    fresh: bool = False  # a folder pool decoded by this call (not reused)
    pool_identity: dict | None = None  # folder pools: what the run records to recognise its pool (folder.pool_identity)

    def __post_init__(self) -> None:
        if self.ids is None:
            self.ids = [f"train/{i}" for i in range(len(self.x_train))]
        if self.mean is None or self.std is None:
            self.mean, self.std = compute_mean_std(self.x_train)

    @property
    def n_pool(self) -> int:
        return int(len(self.x_train))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_ground_truth(self) -> bool:
        """True for the labeled benchmarks (simulation: oracle labels, curves); False for an unlabeled pool."""
        return self.y_train is not None

    @property
    def has_test(self) -> bool:
        return self.x_test is not None and len(self.x_test) > 0

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[3])

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.x_train.shape[1]), int(self.x_train.shape[2])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[1])


# ---------------------------------------------------------------- public helpers
def compute_mean_std(x, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 [N, H, W, C] images in [0, 1] units; std floored at 1e-3.

    Exact and memory-bounded: a 256-bin histogram per channel, accumulated over chunks of images, then float64
    moments from the histogram (6x faster than float64 sums on 10k CIFAR images)."""
    c = x.shape[-1]
    counts = np.zeros((c, 256), dtype=np.int64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].reshape(-1, c)  # [n*H*W, C]
        counts += np.stack([np.bincount(part[:, j], minlength=256) for j in range(c)])
    values = np.arange(256) / 255.0
    n = np.maximum(counts.sum(1), 1).astype(np.float64)
    mean = counts @ values / n  # [C]
    std = np.sqrt(np.maximum(counts @ (values * values) / n - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(v, 1e-3)) for v in std)


def to_tensor(x: np.ndarray, mean, std) -> "torch.Tensor":
    """uint8 [N, H, W, C] -> float32 [N, C, H, W], (x/255 - mean) / std per channel."""
    import torch

    if x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"to_tensor expects uint8 [N, H, W, C], got {x.dtype} {x.shape}")
    src = torch.from_numpy(x).permute(0, 3, 1, 2)  # [N, C, H, W] view, no copy
    out = torch.empty(src.shape, dtype=torch.float32)
    out.copy_(src)  # one pass: NHWC uint8 -> contiguous NCHW float32
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return out.mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)


class PoolReader:
    """uint8 [B, C, H, W] batches of the training pool on `device`, wherever the pixels live.

    An in-memory pool is moved to the device once and indexed there (the fast path for pools that fit); an
    on-disk pool is read batch by batch (`DiskPool`, os.pread) and only the batch is copied to the device."""

    def __init__(self, x, device: "torch.device | str" = "cpu"):
        import torch

        self.device = torch.device(device)
        self.on_device = isinstance(x, np.ndarray)
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(self.device) if self.on_device else x

    def __len__(self) -> int:
        return len(self.x)

    def __call__(self, idx) -> "torch.Tensor":
        """Rows `idx` (int array or tensor) as uint8 [B, C, H, W] on the device, in the order given."""
        import torch

        if self.on_device:
            return self.x[torch.as_tensor(idx, device=self.device)]
        idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        rows = torch.from_numpy(self.x[idx]).permute(0, 3, 1, 2).contiguous()
        return rows.to(self.device, non_blocking=True)


def long_tail_counts(n_max: int, num_classes: int, gamma: float) -> list[int]:
    """CIFAR-10-LT profile: n_k = int(n_max * (1/gamma)^(k/(C-1))), k = 0 largest, at least 1 (arXiv:1906.07413)."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * (1.0 / gamma) ** (k / (num_classes - 1)))) for k in range(num_classes)]


def make_long_tail(y: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of y to keep: class rank k (by class id, among classes present) keeps n_k random samples,
    n_max = the smallest class size, so the ratio largest/smallest is gamma (up to rounding)."""
    present = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in present]
    counts = long_tail_counts(min(len(i) for i in by_class), len(present), gamma)
    keep = [rng.choice(idx, size=n, replace=False) for idx, n in zip(by_class, counts)]
    return np.sort(np.concatenate(keep))


def is_benchmark_folder(root: Path) -> bool:
    """The labeled benchmark layout: DIR/train/ and DIR/test/ both present."""
    return (root / "train").is_dir() and (root / "test").is_dir()


def is_pool_spec(spec: str) -> bool:
    """True when SPEC names an unlabeled image folder (not digits / .npz / cifar10: / the benchmark layout)."""
    spec = str(spec)
    if spec == "digits" or spec.startswith("cifar10:") or spec.lower().endswith(".npz"):
        return False
    root = Path(spec).expanduser()
    return root.is_dir() and not is_benchmark_folder(root)


# ---------------------------------------------------------------- entry point
def load_dataset(spec: str, *, imbalance: float | None = None, seed: int = 0, test: str | Path | None = None,
                 classes: list[str] | None = None, image_size: int | None = None, strict: bool = False,
                 pool_dir: Path | None = None, workers: int | None = None, quiet: bool = True,
                 expect: dict | None = None, jpeg_draft: bool = True, pool_format: str | None = None) -> Dataset:
    """Load a dataset SPEC (see module doc).

    Folder pools also take `test` (a labeled ImageFolder), `classes`, `image_size`, `strict`, `pool_dir` (where the
    decoded pool lives: `RUN/pool`) and `pool_format` (how it stores the pixels: "raw", "jpeg" or "auto"/None: JPEG
    above 64 px); `imbalance=G` makes a labeled training split long-tailed (test untouched)."""
    from alssl.data import specs

    spec = str(spec)
    jpeg_draft = jpeg_draft is not False  # None (not given) = the default, draft decoding on
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"--image-size must be a whole number of pixels >= 1 (got {image_size}); e.g. --image-size 64")
    if pool_format == "auto":
        pool_format = None
    root = Path(spec).expanduser()
    if expect is not None:  # a run's image-folder pool: read from RUN/pool, the folder itself only to (re)build it
        return _load_pool(root, test=test, classes=classes, image_size=image_size, strict=strict, pool_dir=pool_dir,
                          workers=workers, quiet=quiet, expect=expect, draft=jpeg_draft, pool_format=pool_format)
    if is_pool_spec(spec):
        if imbalance is not None:
            raise UserError("--imbalance needs ground-truth labels to cut a long tail; it only applies to the labeled "
                            "benchmarks (digits, FILE.npz, DIR/train+test, cifar10:DIR)")
        if (root / "train").is_dir() or (root / "test").is_dir():
            half = "test" if (root / "train").is_dir() else "train"
            warn(f"{root} has no {half}/ folder, so it is read as an unlabeled pool (every image under it); for the "
                 f"labeled benchmark layout give both {root}/train/<class>/ and {root}/test/<class>/")
        return _load_pool(root, test=test, classes=classes, image_size=image_size, strict=strict, pool_dir=pool_dir,
                          workers=workers, quiet=quiet, expect=expect, draft=jpeg_draft, pool_format=pool_format)
    given = [k for k, v in (("test", test), ("classes", classes), ("image_size", image_size),
                            ("pool_format", pool_format)) if v is not None]
    if not jpeg_draft:
        given.append("no_jpeg_draft")
    if given:
        flag = "--" + given[0].replace("_", "-")
        if not root.exists() and spec != "digits" and not spec.startswith("cifar10:") and not spec.endswith(".npz"):
            raise UserError(f"no such folder: {spec}; {flag} goes with an image folder, so give --data the folder "
                            f"that holds your images")
        raise UserError(f"{flag} applies to an unlabeled image folder; {spec} is a labeled benchmark with its own test "
                        f"split and classes, so drop {flag}")
    if spec == "digits":
        ds = specs.load_digits()
    elif spec.startswith("cifar10:"):
        ds = specs.load_cifar10(spec, Path(spec[len("cifar10:") :]).expanduser())
    elif spec.lower().endswith(".npz"):
        ds = specs.load_npz(spec, root)
    elif root.is_dir():
        ds = specs.load_image_folder(spec, root)
    elif "/" in spec or "\\" in spec:
        raise UserError(f"no such file or directory: {spec}; valid SPECs: {SPECS}")
    else:
        raise UserError(f'unknown dataset "{spec}"{suggest(spec, ["digits", "cifar10:DIR"])}; valid SPECs: {SPECS}')
    if imbalance is None:
        return ds
    if not isinstance(imbalance, numbers.Real) or not math.isfinite(imbalance) or imbalance < 1:
        raise UserError(f"--imbalance must be a number >= 1 (largest/smallest class ratio), got {imbalance}")
    keep = make_long_tail(ds.y_train, float(imbalance), np.random.default_rng(seed))
    return Dataset(x_train=ds.x_train[keep], y_train=ds.y_train[keep], x_test=ds.x_test, y_test=ds.y_test,
                   classes=ds.classes, ids=[ds.ids[i] for i in keep], name=ds.name)


def _load_pool(root: Path, *, test, classes, image_size, strict, pool_dir, workers, quiet, expect,
               draft: bool = True, pool_format: str | None = None) -> Dataset:
    from alssl.data import folder

    if pool_dir is None:
        raise UserError(f"{root} is an unlabeled image folder: it is used through a run dir "
                        f"(`alssl pretrain --data {root} --out RUN`)")
    test_dir = None if test is None else Path(test).expanduser()
    gone = test_dir is not None and expect is not None and not test_dir.is_dir()  # a run's test folder moved away
    names = folder.resolve_classes(classes, None if gone else test_dir)  # --classes against --test before decoding
    pool, fresh = folder.open_pool(root, Path(pool_dir), image_size=image_size, strict=strict, workers=workers,
                                   quiet=quiet, expect=expect, draft=draft, pool_format=pool_format)
    x_test = y_test = None
    skipped = list(pool.skipped)
    if test_dir is not None:
        x_test, y_test, test_skipped = folder.load_test_folder(test_dir, Path(pool_dir), classes=names,
                                                               image_size=pool.image_size,
                                                               channels=pool.pixels.shape[3], workers=workers,
                                                               quiet=quiet, draft=draft)
        skipped += test_skipped
    return Dataset(x_train=pool.pixels, y_train=None, x_test=x_test, y_test=y_test, classes=names, ids=pool.ids,
                   mean=pool.mean, std=pool.std, name=str(root), skipped=skipped, fresh=fresh,
                   pool_identity=pool.identity)


def run_dataset(run, *, quiet: bool = True) -> Dataset:
    """A run's dataset (`alssl.runs.Run`) exactly as it was when the run was made (an image folder's RUN/pool,
    rebuilt from the folder if it was deleted: call it under `run_lock(run.path)`)."""
    cfg = run.data_config
    dataset = load_dataset(cfg["spec"], imbalance=cfg.get("imbalance"), seed=cfg.get("seed", 0), test=cfg.get("test"),
                           classes=cfg.get("classes"), image_size=cfg.get("image_size"),
                           strict=cfg.get("strict", False), pool_dir=run.path / "pool", quiet=quiet,
                           expect=cfg.get("pool"), jpeg_draft=cfg.get("jpeg_draft", True),
                           pool_format=cfg.get("pool_format"))
    if dataset.n_pool != run.n_pool:
        raise UserError(f"the data {cfg['spec']} no longer matches {run.path} ({dataset.n_pool} vs {run.n_pool} "
                        f"samples); restore the data or start a new run")
    return dataset
