"""Feature sets of a run: frozen-backbone embeddings of the pool, cached per checkpoint, and the strongest one chosen
by measurement on the labels.

A run can hold several feature extractors over the same pool (docs/features.md):
- `ssl`: the stage-1 result, `checkpoints/backbone.pt` (named `start` instead when stage 1 ran 0 epochs: then it *is*
  the starting point);
- `start`: the weights stage 1 started from (seeded random init, or the `--init` weights), `checkpoints/start.pt`,
  written when pretraining begins;
- any added with `alssl features RUN --add BACKBONE [--init PATH|hub]`: `checkpoints/features-<name>.pt`, listed in
  `RUN/feature_sets.json` (which also holds a pinned choice, if the user made one).

Embeddings are cached by the sha256 of the checkpoint: `RUN/features/<sha16>-train.npy` [N, D] and `-test.npy`
[M, D] (M = 0 without a labeled test set), float32, written shard by shard and returned memory-mapped (docs/scale.md).
It is a cache: an unreadable or mismatched file (or an old `<sha16>.npz`) is recomputed.

Which set probing, queries, export and the semi fine-tune use (`choose`): the pinned one if the user pinned one; else,
with at least 2 labels per class on average and two classes with 2 or more labels, the best mean accuracy of the
linear probe under stratified k-fold cross-validation on the labeled set (repeated 3 times up to 2,000 labels; the
test set is never used to choose); with fewer labels, the highest RankMe (Garrido et al. 2023, arXiv 2210.02885) —
a label-free proxy. Ties keep the earlier set in the order ssl, added sets, start.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alssl.backbones import load_backbone_checkpoint
from alssl.data import Dataset, to_tensor
from alssl.errors import UserError, warn
from alssl.runs import Run, atomic_write_text, disk_error, fsync_dir

REGISTRY = "feature_sets.json"
SSL, START = "ssl", "start"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
RANKME_ROWS = 2048  # pool rows RankMe is computed on (evenly spaced): enough for D ≤ 2048, cheap at any N


@torch.no_grad()
def embed(model: nn.Module, x, *, mean, std, batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """Features [N, D] float32 of uint8 images [N, H, W, C] (an array or a DiskPool) through `model` in eval mode."""
    model = model.eval().to(device)
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_tensor(x[i : i + batch_size], mean, std).to(device)  # [B, C, H, W]
        out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(model, "dim", 0)), np.float32)


@torch.no_grad()
def embed_to_file(model: nn.Module, x, path: Path, *, mean, std, batch_size: int = 512, dim: int | None = None,
                  dtype=np.float32, setting=None, quiet: bool = True, label: str = "embedding") -> np.ndarray:
    """Features of uint8 images x [N, H, W, C] (an array or a DiskPool) written to the `.npy` file `path` and
    returned memory-mapped (read-only), float32 (or `dtype`, e.g. float16) [N, D].

    Peak memory is flat in N: a temp file beside `path` gets the `.npy` header and its full size first; the pool is
    read batch by batch (the next batch by a background thread while this one runs through the model under
    `fabric.autocast()`; on a GPU the batch travels as pinned uint8 and is normalised on the device) and every
    output batch goes to its rows with `os.pwrite` (never mapped, never
    gathered); then fsync and an atomic rename. `setting` (default `alssl.devices.current()`) with devices > 1 or
    num_nodes > 1 shards the rows over that many processes (Fabric DDP, gloo on a CPU): global rank r of W embeds the
    contiguous rows [r·N/W, (r+1)·N/W) into the same file, so 1 and W processes write the same matrix. Over several
    nodes every node runs this call (the same command on each, docs/scale.md) and `path` must be on a filesystem
    they share: global rank 0 alone creates the temp file and renames it after a barrier (every rank has written);
    the other nodes never create, rename or delete anything."""
    from alssl import devices as dev

    setting = setting or dev.current()
    path = Path(path)
    n = len(x)
    d = int(dim if dim is not None else _feature_dim(model, x, mean, std))
    dtype = np.dtype(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    job = dict(mean=mean, std=std, batch_size=batch_size, dtype=dtype, quiet=quiet, label=label)
    per_node = setting.devices if setting.num_nodes > 1 else min(setting.devices, n)  # every node launches alike
    try:
        offset = _new_npy(tmp, (n, d), dtype) if dev.node_rank() == 0 else None  # only node 0 creates the file
        if per_node * setting.num_nodes > 1:
            strategy = "ddp_spawn" if setting.accelerator != "cpu" and torch.cuda.is_available() else "ddp_fork"
            env = dict(os.environ)  # the launcher sets MASTER_PORT (and Lightning a few flags) in this process
            try:
                fabric = dev.fabric(dev.Devices(setting.accelerator, per_node, setting.precision, setting.num_nodes),
                                    strategy=strategy)
                fabric.launch(_embed_shard, model, x, (tmp, offset), path, n, per_node, job)
            finally:
                for key in set(os.environ) - set(env):
                    del os.environ[key]
                os.environ.update(env)
        else:
            if n:
                device, autocast = dev.single(setting)
                _embed_rows(model, x, tmp, offset, 0, n, device=device, autocast=autocast, **job)
            _finalise(tmp, path)
    except BaseException as exc:
        if dev.node_rank() == 0:  # the temp file is node 0's (made above); other nodes leave it alone
            with contextlib.suppress(OSError):
                tmp.unlink()
        if (err := disk_error(exc, path)) is not None:
            raise err from None
        raise
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _finalise(tmp: Path, path: Path) -> None:
    """fsync the written temp file, rename it to `path` atomically, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _feature_dim(model: nn.Module, x, mean, std) -> int:
    dim = getattr(model, "dim", None)
    if isinstance(dim, int) and dim > 0:
        return dim
    if len(x) == 0:
        raise ValueError("cannot tell the feature dimension of a model without a `dim` from no images")
    return int(model.eval()(to_tensor(np.asarray(x[:1]), mean, std)).shape[1])


def _new_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Create the `.npy` file `path` for an array of `shape` (header written, data not: a sparse file of the full
    size); returns the byte offset of row 0."""
    with open(path, "wb") as f:
        if os.environ.get("ALSSL_FAULT_DISK_FULL"):  # fault injection for the tests (alssl/faults.py)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": shape})
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
    return offset


def _embed_shard(fabric, model: nn.Module, x, made: tuple[Path, int | None], path: Path, n: int, per_node: int,
                 job: dict) -> None:
    """One Fabric rank: embed its contiguous share of the rows into the shared file (no collective per batch).
    The temp file is node 0's (its name and row offset travel from global rank 0 to every rank, on every node);
    after a barrier that every rank reaches once its rows are written, global rank 0 renames it into place, and a
    last barrier lets every node read it."""
    rank, world = fabric.global_rank, fabric.world_size
    if fabric.device.type == "cpu":  # the processes of one CPU split its cores rather than oversubscribe them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    tmp, offset = fabric.broadcast(made, src=0)
    start, stop = rank * n // world, (rank + 1) * n // world
    job = {**job, "quiet": job["quiet"] or rank > 0, "label": f"{job['label']} (rank 0 of {world})"}
    _embed_rows(model, x, tmp, offset, start, stop, device=fabric.device, autocast=fabric.autocast, **job)
    fabric.barrier()
    if rank == 0:
        _finalise(tmp, path)
    fabric.barrier()


def _embed_rows(model: nn.Module, x, path: Path, offset: int, start: int, stop: int, *, device, autocast, mean, std,
                batch_size: int, dtype: np.dtype, quiet: bool, label: str) -> None:
    """Rows [start, stop) of x through `model` on `device`, written in place into the `.npy` at `path`."""
    import time

    from alssl.prefetch import ahead
    from alssl.progress import progress_bar

    model = model.eval().to(device)
    on_cpu = device.type == "cpu"
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def read(i: int) -> torch.Tensor:  # runs on the reader thread, one batch ahead
        rows = np.ascontiguousarray(x[i : min(i + batch_size, stop)])  # uint8 [B, H, W, C]
        if on_cpu:  # normalised here, off the main thread: float32 [B, C, H, W]
            return to_tensor(rows, mean, std)
        # an accelerator: uint8 (4x fewer bytes over the bus) in pinned memory, normalised on the device
        xb = torch.from_numpy(rows).permute(0, 3, 1, 2)
        return xb.pin_memory() if device.type == "cuda" else xb

    def on_device(xb: torch.Tensor) -> torch.Tensor:  # the same arithmetic as data.to_tensor
        xb = xb.to(device, non_blocking=True)
        return xb if on_cpu else xb.float().mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)

    bar, task = progress_bar(label, stop - start, 0, quiet=quiet, fields={"img/s": "-"})
    t0, done = time.perf_counter(), 0
    with open(path, "r+b") as f, (bar or contextlib.nullcontext()):
        fd = f.fileno()
        for i, xb in ahead(read, range(start, stop, batch_size), device=device):
            with torch.no_grad(), autocast():
                fb = model(on_device(xb))  # [B, D]
            block = np.ascontiguousarray(fb.float().cpu().numpy(), dtype=dtype)
            _pwrite_all(fd, memoryview(block).cast("B"), offset + i * block.shape[1] * dtype.itemsize)
            done += len(block)
            if bar is not None:
                bar.update(task, advance=len(block), **{"img/s": f"{done / (time.perf_counter() - t0):.0f}"})


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while len(data):
        k = os.pwrite(fd, data, pos)
        data, pos = data[k:], pos + k


def file_digest(path: Path) -> str:
    """sha256 (16 hex digits) of a checkpoint's bytes; read once per file version (path, size, mtime) per process:
    `choose` names a set's embeddings and its scores by it, and the command then opens the chosen set again."""
    st = os.stat(path)
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def rankme(features: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of features [n, D].

    A label-free proxy of representation quality, between 1 (collapsed to a line) and min(n, D); within one method
    higher tends to mean better downstream accuracy. Computed on at most RANKME_ROWS evenly spaced rows."""
    x = np.asarray(features, np.float64)
    if len(x) > RANKME_ROWS:
        x = x[np.linspace(0, len(x) - 1, RANKME_ROWS).astype(np.int64)]
    if len(x) < 2 or not np.isfinite(x).all():
        return float("nan")
    s = np.linalg.svd(x, compute_uv=False)
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------- the run's feature sets
@dataclass
class FeatureSet:
    name: str
    path: Path  # a backbone checkpoint (alssl/backbones.py backbone_checkpoint)
    origin: str  # what it is, for people


def _registry(run_path: Path) -> dict:
    """RUN/feature_sets.json: {"pinned": NAME | null, "added": {NAME: {"file", "backbone", "init"}}}."""
    path = Path(run_path) / REGISTRY
    if not path.exists():
        return {"pinned": None, "added": {}}
    try:
        reg = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path} is damaged (not JSON); delete it (the added feature sets are then forgotten) or "
                        f"restore it") from None
    added = reg.get("added") if isinstance(reg, dict) else None
    if not isinstance(added, dict) or not all(isinstance(v, dict) and isinstance(v.get("file"), str)
                                              and NAME_RE.fullmatch(k) for k, v in added.items()) \
            or not (reg.get("pinned") is None or isinstance(reg.get("pinned"), str)):
        raise UserError(f"{path} is damaged (wrong shape); delete it (the added feature sets are then forgotten) or "
                        f"restore it")
    return {"pinned": reg.get("pinned"), "added": added}


def _save_registry(run_path: Path, reg: dict) -> None:
    atomic_write_text(Path(run_path) / REGISTRY, json.dumps(reg, indent=1, sort_keys=True) + "\n")


def feature_sets(run: Run) -> dict[str, FeatureSet]:
    """The run's feature sets by name, in tie-break order: ssl, the added ones (as added), start."""
    ck = run.checkpoints
    out: dict[str, FeatureSet] = {}
    pre = run.stages.get("pretrain", {})
    if (ck / "backbone.pt").exists():
        if pre.get("epochs", 1) == 0:
            out[START] = FeatureSet(START, ck / "backbone.pt", f"stage-1 backbone as it started ({_init_text(run)}, "
                                                                 f"0 epochs)")
        else:
            out[SSL] = FeatureSet(SSL, ck / "backbone.pt", f"stage 1: {pre.get('method', 'ssl')} "
                                                             f"{pre.get('epochs', '?')} epochs")
    for name, entry in _registry(run.path)["added"].items():
        path = run.path / entry["file"]
        if path.exists():
            out[name] = FeatureSet(name, path, f"added: {entry.get('backbone')}"
                                   + (f" from {entry['init']}" if entry.get("init") else " (random init)"))
    if (ck / "start.pt").exists() and START not in out:
        out[START] = FeatureSet(START, ck / "start.pt", f"the weights stage 1 started from ({_init_text(run)})")
    return out


def _init_text(run: Run) -> str:
    init = run.config.get("pretrain", {}).get("init")
    return "random init" if not init else ("hub weights" if init == "hub" else f"--init {Path(init).name}")


def feature_paths(run_path: Path, ckpt: Path) -> tuple[Path, Path]:
    """`RUN/features/<sha16 of the checkpoint>-train.npy` and `-test.npy`."""
    stem = Path(run_path) / "features" / file_digest(ckpt)
    return stem.with_name(stem.name + "-train.npy"), stem.with_name(stem.name + "-test.npy")


def _cached(path: Path, rows: int) -> np.ndarray | None:
    """The memory-mapped matrix at `path` if it is a readable float32 [rows, D] `.npy`, else None."""
    if not path.exists():
        return None
    try:
        got = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return got if got.ndim == 2 and got.dtype == np.float32 and len(got) == rows else None


def pool_features(run_path: Path, dataset: Dataset, ckpt: Path | None = None, *,
                  quiet: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train [N, D], test [M, D]) float32 embeddings of a backbone checkpoint (default: the stage-1 `backbone.pt`),
    computed once per checkpoint into `RUN/features/<sha16>-train.npy` / `-test.npy` and returned memory-mapped
    (read-only): nothing [N, D]-sized is held in RAM. Runs where `alssl.devices.current()` says (embed_to_file),
    with a progress bar (img/s) when stderr is a terminal and `quiet` is not True."""
    ckpt = Path(ckpt) if ckpt is not None else Path(run_path) / "checkpoints" / "backbone.pt"
    model, _ = load_backbone_checkpoint(ckpt, expect_channels=dataset.channels)
    train_path, test_path = feature_paths(run_path, ckpt)
    n_test = len(dataset.x_test) if dataset.has_test else 0
    train, test = _cached(train_path, dataset.n_pool), _cached(test_path, n_test)
    if train is not None and test is not None and train.shape[1] == test.shape[1]:
        return train, test
    if train_path.exists() or test_path.exists():
        warn(f"the feature cache {train_path} is unreadable or does not match the data; recomputing it")
    torch.manual_seed(0)
    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    train = embed_to_file(model, dataset.x_train, train_path, mean=dataset.mean, std=dataset.std, quiet=quiet,
                          label="embedding the pool")
    test = embed_to_file(model, dataset.x_test if n_test else np.zeros((0, *dataset.x_train.shape[1:]), np.uint8),
                         test_path, mean=dataset.mean, std=dataset.std, dim=train.shape[1], quiet=quiet,
                         label="embedding the test set")
    old = train_path.with_name(train_path.name[: -len("-train.npy")] + ".npz")  # the cache format before .npy
    with contextlib.suppress(OSError):
        old.unlink()
    return train, test


# ---------------------------------------------------------------- choosing by measurement
@dataclass
class Choice:
    """Which feature set a command uses, and why; `scores` holds every set's numbers (JSON-ready)."""

    name: str
    why: str
    path: Path
    scores: dict = field(default_factory=dict)  # name -> {"cv_accuracy", "rankme", "test_accuracy"?, "origin"}

    def line(self) -> str:
        """`features (test accuracy): ssl 0.280 · start 0.305 (in use: start)`: test accuracy where the run has a test
        set, else the cross-validated accuracy on the labels, else RankMe."""
        on_test = all("test_accuracy" in s for s in self.scores.values())
        key, what = ("test_accuracy", "test accuracy") if on_test else ("cv_accuracy", "cross-validated accuracy")
        if all(s.get(key) is None for s in self.scores.values()):
            what = "RankMe, a label-free proxy: too few labels to measure"
        parts = []
        for name, s in self.scores.items():
            v = s.get(key)
            parts.append(f"{name} {v:.3f}" if v is not None else f"{name} RankMe {s['rankme']:.1f}")
        return f"features ({what}): {' · '.join(parts)} (in use: {self.name})"

    def record(self) -> dict:
        return {"features": self.name, "features_why": self.why}


def cv_choice_accuracy(x: np.ndarray, y: np.ndarray, *, num_classes: int, seed: int = 0) -> float | None:
    """Mean accuracy of the linear probe under stratified k-fold CV on the labels (what `choose` compares).

    Classes with a single label sit out (no fold could hold them out); k = min(5, smallest remaining class count);
    repeated 3 times with reshuffled folds up to 2,000 labels (40 labels make a noisy single split). None below about
    2 labels per class (fewer than 2·present classes labels, or fewer than two classes with 2+ labels)."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    from alssl.probes import fit_probe

    y = np.asarray(y).astype(np.int64)
    counts = np.bincount(y, minlength=num_classes)
    keep_classes = np.flatnonzero(counts >= 2)
    if len(y) < 2 * np.count_nonzero(counts) or len(keep_classes) < 2:
        return None
    keep = np.isin(y, keep_classes)
    x, y = x[keep], y[keep]
    k = int(min(5, counts[keep_classes].min()))
    repeats = 3 if len(y) <= 2000 else 1
    correct = total = 0
    for tr, te in RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed).split(x, y):
        model = fit_probe("linear", x[tr], y[tr], num_classes=num_classes, seed=seed)
        correct += int((model.predict(x[te]) == y[te]).sum())
        total += len(te)
    return correct / total


def _measured(cache: Path, key: str, train: np.ndarray, idx: np.ndarray, y: np.ndarray, num_classes: int,
              seed: int) -> dict:
    """{"rankme", "cv_accuracy"} of one feature set on these labels, cached beside its embeddings (a small JSON keyed
    by the labeled set: every command on the same labels measures once)."""
    try:
        saved = json.loads(cache.read_text())
        got = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(got, dict) and set(got) == {"rankme", "cv_accuracy"}:
            return got
    except (OSError, ValueError, UnicodeDecodeError):
        saved = {}
    cv = cv_choice_accuracy(train[idx], y, num_classes=num_classes, seed=seed) if len(idx) else None
    got = {"rankme": round(rankme(train), 2), "cv_accuracy": None if cv is None else round(cv, 4)}
    keep = {k: v for k, v in (saved if isinstance(saved, dict) else {}).items()}
    keep = dict(list(keep.items())[-31:])  # the last 32 labeled sets
    from alssl.devices import global_zero

    if global_zero():  # DDP ranks > 0 and other nodes compute the same and write nothing
        atomic_write_text(cache, json.dumps({**keep, key: got}))
    return got


def choose(run: Run, dataset: Dataset, *, test_probe: str | None = None, kernel: str = "linear",
           seed: int = 0) -> Choice:
    """The feature set to use on this run's labels (module doc), with every set's scores.

    `test_probe` ("linear" | "svm"): also report each set's test accuracy with that probe (reporting only: the test set
    never takes part in the choice)."""
    from alssl.probes import fit_probe

    sets = feature_sets(run)
    if not sets:
        raise UserError(f"{run.path} has no stage-1 backbone; run `alssl pretrain` first")
    idx = run.labeled_indices
    y = run.labels[idx]
    scores: dict[str, dict] = {}
    labels_key = hashlib.sha256(np.stack([idx, y]).astype(np.int64).tobytes() + str(seed).encode()).hexdigest()[:16]
    for name, fs in sets.items():
        train, test = pool_features(run.path, dataset, fs.path)
        s: dict = {"origin": fs.origin, **_measured(run.path / "features" / f"{file_digest(fs.path)}.scores.json",
                                                    labels_key, train, idx, y, dataset.num_classes, seed)}
        if len(idx):
            if test_probe is not None and dataset.has_test:
                model = fit_probe(test_probe, train[idx], y, num_classes=dataset.num_classes, kernel=kernel, seed=seed)
                s["test_accuracy"] = round(float(model.accuracy(test, dataset.y_test)), 4)
        scores[name] = s
    pinned = _registry(run.path)["pinned"]
    if pinned is not None and pinned in sets:
        return Choice(pinned, f"pinned by the user (`alssl features {run.path} --use {pinned}`)", sets[pinned].path,
                      scores)
    if pinned is not None:
        warn(f"the pinned feature set {pinned!r} is gone from {run.path}; choosing by measurement instead")
    if len(sets) == 1:
        name = next(iter(sets))
        return Choice(name, "the only feature set this run holds", sets[name].path, scores)
    if all(s["cv_accuracy"] is not None for s in scores.values()):
        name = max(scores, key=lambda n: scores[n]["cv_accuracy"])  # max keeps the first of equals
        others = ", ".join(f"{n} {s['cv_accuracy']:.3f}" for n, s in scores.items() if n != name)
        why = (f"best linear-probe cross-validated accuracy on the {len(idx)} labels: {scores[name]['cv_accuracy']:.3f}"
               f" (vs {others})")
        return Choice(name, why, sets[name].path, scores)
    ranked = {n: (s["rankme"] if np.isfinite(s["rankme"]) else -1.0) for n, s in scores.items()}
    name = max(ranked, key=ranked.get)
    others = ", ".join(f"{n} {r:.1f}" for n, r in ranked.items() if n != name)
    why = (f"too few labels to cross-validate ({len(idx)}; need about 2 per class): highest RankMe, a label-free "
           f"proxy: {ranked[name]:.1f} (vs {others})")
    return Choice(name, why, sets[name].path, scores)


# ---------------------------------------------------------------- adding and pinning
def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (SSL, START, "auto"):
        raise UserError(f"feature set name {name!r} is not allowed; use letters, digits and . _ : + - (up to 64 "
                        f"characters), not ssl, start or auto")
    return name


def default_name(backbone: str, init: str | None) -> str:
    """`timm:resnet50` (random init or hub weights are told apart by the record), or `cnn+stage1_backbone` for a
    file."""
    if init is None or init == "hub":
        return backbone if init == "hub" else f"{backbone}+random"
    return f"{backbone}+{re.sub(r'[^A-Za-z0-9._-]', '_', Path(init).stem)[:40]}"


def add_feature_set(run: Run, dataset: Dataset, *, backbone: str, init: str | None, name: str) -> FeatureSet:
    """Build `backbone` (from `init`), check it takes the pool's images, save it as a backbone checkpoint and
    register it under `name`; the caller holds the run lock."""
    from alssl.backbones import backbone_checkpoint, build_backbone, check_input_size, load_init_weights
    from alssl.runs import atomic_torch_save

    check_name(name)
    reg = _registry(run.path)
    if name in reg["added"]:
        raise UserError(f"{run.path} already has a feature set named {name!r}; pick another --name")
    torch.manual_seed(0)
    model = build_backbone(backbone, dataset.channels)
    if init is not None:
        load_init_weights(model, backbone, init)  # refuses weights that do not fit, or are not finite
    check_input_size(model, backbone, dataset.channels, dataset.image_size)
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    rel = f"checkpoints/features-{slug}.pt"
    if any(e["file"] == rel for e in reg["added"].values()):
        rel = f"checkpoints/features-{slug}-{len(reg['added'])}.pt"
    atomic_torch_save(backbone_checkpoint(model, name=backbone, in_channels=dataset.channels, feature_set=name,
                                          init=init), run.path / rel)
    reg["added"][name] = {"file": rel, "backbone": backbone, "init": init}
    _save_registry(run.path, reg)
    return feature_sets(run)[name]


def pin(run: Run, name: str) -> None:
    """Use feature set `name` everywhere (`auto`: choose by measurement again)."""
    reg = _registry(run.path)
    if name == "auto":
        reg["pinned"] = None
    else:
        sets = feature_sets(run)
        if name not in sets:
            from alssl.errors import unknown

            raise unknown("feature set", name, list(sets) + ["auto"])
        reg["pinned"] = name
    _save_registry(run.path, reg)
