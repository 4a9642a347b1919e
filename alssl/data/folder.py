"""An unlabeled image folder as an on-disk pool: scanned, decoded once in parallel, read back batch by batch.

`build_pool` walks DIR recursively (sorted relative paths = the pool's one index space), reads every header, picks
the image size and channel count, decodes every file in worker processes (`images.load_image`) straight into a
uint8 `.npy` file, and writes a manifest of (path, bytes, mtime) for every file it saw. Unreadable files (and
unreadable subfolders) are skipped and listed. `ids_sha256` (of the pool's paths in index order) and the manifest's
`content_sha256` (those paths with the SHA-256 of each file's bytes) are the pool's identity: a run records them,
and `open_pool` refuses a pool, reused or rebuilt, whose identity differs (a same-count change to the folder would
otherwise move labels onto other photos). `open_pool` also refuses a reused pool whose folder changed since it was
built, and a damaged manifest or pixel file. The pixels are stored as raw uint8 rows (`DiskPool`) or, for images
above 64 px by default, as one JPEG each (`JpegPool`, decoded on read: `--pool-format`, `pool_format_for`). Both read
with `os.pread`, not a memory map, so a process's resident memory holds a batch, never the pool.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alssl.data.images import IMAGE_EXTS, decode_chunk, image_mode_is_gray, is_image_file, peek_chunk
from alssl.errors import UserError, suggest

MANIFEST = "manifest.json"
PIXELS = "pixels.npy"  # raw pools: uint8 [N, S, S, C]
JPEGS = "pixels.jpegs"  # JPEG pools: every image's JPEG bytes, back to back in index order
OFFSETS = "pixels-offsets.npy"  # JPEG pools: int64 [N + 1], image i = bytes offsets[i]:offsets[i + 1] of JPEGS
TEST = "test.npz"
FORMAT = 1
CHUNK = 64  # files per worker task
POOL_FORMATS = ("auto", "raw", "jpeg")
JPEG_ABOVE = 64  # auto: raw rows up to 64 px, JPEG above (FFCV's "raw for small, JPEG for large")
JPEG_QUALITY = 90  # FFCV's default; ~7.5x (64 px) to ~23x (224 px) smaller than raw rows (docs/scale.md)
DECODE_INLINE = 16  # a read of fewer JPEGs than this decodes them on the calling thread


# ---------------------------------------------------------------- reading a built pool
class _PoolFile:
    """What both on-disk pools share: a file read with `os.pread` (reopened in a worker process), array-style
    indexing (int, slice, int or bool array, negative indices) turned into one `_rows(indices)` call."""

    path: Path
    shape: tuple[int, ...]
    _fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for a pool of {n}")
            return self._rows(np.array([i]))[0]
        if isinstance(key, slice):
            return self._rows(np.arange(*key.indices(n)))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a pool of {n}")
        return self._rows(np.where(idx < 0, idx + n, idx))

    def _rows(self, idx: np.ndarray) -> np.ndarray:  # images `idx` (valid, non-negative) in the order given
        raise NotImplementedError


def consecutive_runs(sorted_idx: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, stop) positions of the runs of consecutive indices in `sorted_idx`: one `pread` each."""
    start = 0
    while start < len(sorted_idx):
        stop = start + 1
        while stop < len(sorted_idx) and sorted_idx[stop] - sorted_idx[stop - 1] <= 1:
            stop += 1
        yield start, stop
        start = stop


class DiskPool(_PoolFile):
    """uint8 [N, S, S, C] images stored in a `.npy` file, indexed like an array (int, slice, int array)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                self.offset = f.tell()
        except OSError as exc:
            raise UserError(f"cannot read {self.path} ({exc.strerror}); delete {self.path.parent} and rerun to rebuild "
                            f"the pool") from None
        except (ValueError, SyntaxError, TypeError):  # not an .npy header
            raise UserError(f"{self.path} is not an alssl pool (no .npy header); delete {self.path.parent} and rerun "
                            f"to rebuild the pool") from None
        if dtype != np.uint8 or fortran or len(shape) != 4:
            raise UserError(f"{self.path} is not an alssl pool (uint8 [N, S, S, C]); delete it and rerun to rebuild")
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.dtype, self.ndim = np.dtype(np.uint8), 4
        self.row_bytes = int(np.prod(self.shape[1:]))
        if os.path.getsize(self.path) < self.offset + self.shape[0] * self.row_bytes:
            raise UserError(f"{self.path} is truncated; delete {self.path.parent} and rerun to rebuild the pool")
        self._fd: int | None = None

    def __getstate__(self) -> dict:  # picklable for worker processes: the descriptor is reopened there
        return {**self.__dict__, "_fd": None}

    def _read(self, start: int, n: int) -> bytes:
        data = os.pread(self._file(), n * self.row_bytes, self.offset + start * self.row_bytes)
        if len(data) != n * self.row_bytes:
            raise UserError(f"{self.path} is truncated; delete {self.path.parent} and rerun to rebuild the pool")
        return data

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        for start, stop in consecutive_runs(sorted_idx):
            first = int(sorted_idx[start])
            rows = np.frombuffer(self._read(first, int(sorted_idx[stop - 1]) - first + 1), np.uint8)
            out[order[start:stop]] = rows.reshape((-1, *self.shape[1:]))[sorted_idx[start:stop] - first]
        return out


class JpegPool(_PoolFile):
    """uint8 [N, S, S, C] images kept as one JPEG each (`JPEGS` + `OFFSETS`), indexed like an array (int, slice, int
    array) and decoded on read: a batch is read with one `os.pread` per run of consecutive images and decoded by a
    pool of threads (Pillow's libjpeg runs with the GIL released), into one uint8 array. Decoding the same bytes
    gives the same pixels every time, so reads are deterministic; the pixels are JPEG's, close to the raw ones."""

    def __init__(self, pool_dir: str | Path, n: int, image_size: int, channels: int, threads: int | None = None):
        self.path, self.offsets_path = Path(pool_dir) / JPEGS, Path(pool_dir) / OFFSETS
        fix = f"delete {self.path.parent} and rerun to rebuild the pool"
        try:
            offsets = np.load(self.offsets_path, mmap_mode="r", allow_pickle=False)
            size = os.path.getsize(self.path)
        except OSError as exc:
            raise UserError(f"cannot read {exc.filename or self.path} ({exc.strerror}); {fix}") from None
        except ValueError:  # not an .npy
            raise UserError(f"{self.offsets_path} is not an alssl pool file (no .npy header); {fix}") from None
        if offsets.dtype != np.int64 or offsets.shape != (n + 1,):
            raise UserError(f"{self.offsets_path} holds {offsets.dtype} {list(offsets.shape)}, not the int64 [{n + 1}] "
                            f"offsets of the manifest's {n} images; {fix}")
        if offsets[0] != 0 or offsets[-1] != size:
            raise UserError(f"{self.path} is truncated or does not match its offsets ({size} bytes, the offsets end "
                            f"at {int(offsets[-1])}); {fix}")
        for i in range(0, n, 1 << 20):  # in blocks: memory flat in N
            if np.any(np.diff(offsets[i : i + (1 << 20) + 1]) <= 0):
                raise UserError(f"{self.offsets_path} is damaged (offsets not increasing); {fix}")
        self.shape: tuple[int, ...] = (n, image_size, image_size, channels)
        self.dtype, self.ndim = np.dtype(np.uint8), 4
        self.threads = threads or default_workers()
        self._offsets: np.ndarray | None = offsets
        self._fd: int | None = None

    def __getstate__(self) -> dict:  # picklable for worker processes: the file and the offsets are reopened there
        return {**self.__dict__, "_fd": None, "_offsets": None}

    def _offs(self) -> np.ndarray:
        if self._offsets is None:
            self._offsets = np.load(self.offsets_path, mmap_mode="r", allow_pickle=False)
        return self._offsets

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        """Decoded images `idx` (valid, non-negative) as uint8 [len(idx), S, S, C], in the order given."""
        out = np.empty((len(idx), *self.shape[1:]), np.uint8)
        offs = self._offs()
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        blobs: list[tuple[int, int, memoryview]] = []  # (row of out, image index, JPEG bytes)
        for start, stop in consecutive_runs(sorted_idx):
            first, last = int(sorted_idx[start]), int(sorted_idx[stop - 1])
            base = int(offs[first])
            span = np.asarray(offs[first : last + 2]) - base
            data = os.pread(self._file(), int(span[-1]), base)
            if len(data) != span[-1]:
                raise UserError(f"{self.path} is truncated; delete {self.path.parent} and rerun to rebuild the pool")
            view = memoryview(data)
            for k in range(start, stop):
                j = int(sorted_idx[k]) - first
                blobs.append((int(order[k]), int(sorted_idx[k]), view[span[j] : span[j + 1]]))
        if len(blobs) < DECODE_INLINE or self.threads <= 1:
            self._decode(blobs, out)
        else:
            parts = [blobs[i :: self.threads] for i in range(self.threads)]
            list(_decoders(self.threads).map(lambda part: self._decode(part, out), parts))
        return out

    def _decode(self, blobs: list[tuple[int, int, memoryview]], out: np.ndarray) -> None:
        from PIL import Image

        mode = "L" if self.shape[3] == 1 else "RGB"
        for row, i, blob in blobs:
            try:
                with Image.open(io.BytesIO(blob), formats=["JPEG"]) as im:
                    im = im if im.mode == mode else im.convert(mode)  # a gray image in an RGB pool: repeated
                    a = np.asarray(im)
            except Exception as exc:  # noqa: BLE001 - damaged bytes
                raise UserError(f"{self.path} is damaged (image {i} cannot be decoded: {type(exc).__name__}); delete "
                                f"{self.path.parent} and rerun to rebuild the pool") from None
            if a.shape[:2] != self.shape[1:3]:
                raise UserError(f"{self.path} is damaged (image {i} is {a.shape[1]}x{a.shape[0]}, not "
                                f"{self.shape[2]}x{self.shape[1]}); delete {self.path.parent} and rerun to rebuild "
                                f"the pool")
            out[row] = a.reshape(self.shape[1:])


_DECODERS: tuple[int, int, cf.ThreadPoolExecutor] | None = None  # (pid, threads, pool) shared by every JpegPool
_DECODERS_LOCK = threading.Lock()


def _decoders(threads: int) -> cf.ThreadPoolExecutor:
    """The threads that decode JPEG pools in this process (made again after a fork: threads do not survive it)."""
    global _DECODERS
    with _DECODERS_LOCK:
        if _DECODERS is None or _DECODERS[:2] != (os.getpid(), threads):
            if _DECODERS is not None and _DECODERS[0] == os.getpid():
                _DECODERS[2].shutdown(wait=False)  # another thread count asked for: its idle threads end
            _DECODERS = (os.getpid(), threads, cf.ThreadPoolExecutor(threads, thread_name_prefix="alssl-jpeg"))
        return _DECODERS[2]


def pool_format_for(pool_format: str | None, image_size: int | None) -> str:
    """The storage a new pool gets: `raw` or `jpeg` as asked, or for `auto` (None) raw rows up to JPEG_ABOVE px and
    JPEG above (without --image-size the size is 32 or 64 px: raw)."""
    if pool_format not in (None, *POOL_FORMATS):
        raise UserError(f'unknown pool format "{pool_format}"{suggest(str(pool_format), POOL_FORMATS)}; choose one '
                        f'of: {", ".join(POOL_FORMATS)} (e.g. --pool-format jpeg)')
    if pool_format in ("raw", "jpeg"):
        return pool_format
    return "jpeg" if image_size is not None and image_size > JPEG_ABOVE else "raw"


def open_pixels(pool_dir: Path, m: dict) -> "DiskPool | JpegPool":
    """The pixels of a built pool, as its manifest says they are stored."""
    if m.get("pool_format", "raw") == "jpeg":
        return JpegPool(pool_dir, len(m["pool"]), m["image_size"], m["channels"])
    return DiskPool(pool_dir / PIXELS)


# ---------------------------------------------------------------- scanning
def scan_folder(root: Path, unreadable: list[tuple[str, str]] | None = None) -> list[tuple[str, int, int]]:
    """(relative POSIX path, bytes, mtime_ns) of every image file under root, sorted by path.

    Hidden files and folders (names starting with ".") and alssl run dirs (holding state.json and run.toml) are
    skipped; symlinked files are followed, symlinked folders are not (no loops). A subfolder that cannot be listed
    is appended to `unreadable` as ("sub/folder/", reason), like an unreadable file."""

    def on_error(exc: OSError) -> None:
        if unreadable is not None and exc.filename is not None:
            rel = Path(exc.filename).relative_to(root).as_posix() if Path(exc.filename) != root else "."
            unreadable.append((rel.rstrip("/") + "/", f"folder cannot be listed ({type(exc).__name__}: "
                                                      f"{exc.strerror or exc})"))

    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")
                       and not (os.path.isfile(os.path.join(dirpath, d, "state.json"))
                                and os.path.isfile(os.path.join(dirpath, d, "run.toml")))]
        for name in filenames:
            p = Path(dirpath) / name
            if not is_image_file(p):
                continue
            try:
                st = p.stat()
            except OSError:
                continue  # a dangling symlink is not an image
            out.append((p.relative_to(root).as_posix(), int(st.st_size), int(st.st_mtime_ns)))
    out.sort(key=lambda r: r[0])
    return out


def folder_changes(old: list, new: list) -> str:
    """'' when the two scans are equal, else a short description of what was added / removed / modified."""
    a, b = {r[0]: tuple(r[1:]) for r in old}, {r[0]: tuple(r[1:]) for r in new}
    added = sorted(set(b) - set(a))
    removed = sorted(set(a) - set(b))
    modified = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    parts = []
    for what, names in (("added", added), ("removed", removed), ("modified", modified)):
        if names:
            parts.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return "; ".join(parts)


class Workers:
    """A pool of worker processes shared by the header and decode passes (`workers <= 1`: run inline).

    fork on Linux: workers start in milliseconds and never re-import the caller's __main__ (spawn would re-run an
    unguarded script); they only run PIL + numpy, never torch, so torch's / OpenMP's threads in the parent are
    harmless. Elsewhere spawn, as the platform wants. Workers die with their parent, even on `kill -9` of the
    parent (`_worker_init`)."""

    def __init__(self, workers: int):
        self.ex = None
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.ex = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                             initargs=(os.getpid(),))

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.ex is not None:  # on Ctrl-C or a failure, drop the queued work instead of finishing it
            self.ex.shutdown(wait=True, cancel_futures=exc_type is not None)

    def map(self, fn, tasks: list, progress=None, weights: list[int] | None = None) -> list:
        """fn over tasks, results in task order; `progress(n)` after each task with its weight."""
        if self.ex is None or len(tasks) <= 1:
            out = []
            for i, t in enumerate(tasks):
                out.append(fn(t))
                if progress:
                    progress(weights[i] if weights else 1)
            return out
        results: list = [None] * len(tasks)
        futures = {self.ex.submit(fn, t): i for i, t in enumerate(tasks)}
        for f in cf.as_completed(futures):
            i = futures[f]
            results[i] = f.result()
            if progress:
                progress(weights[i] if weights else 1)
        return results


def _worker_init(parent_pid: int) -> None:
    """Workers leave Ctrl-C to the parent (one clean `error: interrupted` line, no traceback per worker), and die
    with it: on Linux the kernel sends them SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG), even by kill -9,
    so no ~0.5 GB decoder is left orphaned. A parent that died before prctl ran is noticed by its pid."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_parent_death_signal(parent_pid)


def set_parent_death_signal(parent_pid: int) -> None:
    """This process gets SIGKILL when `parent_pid` (its parent) dies (Linux; a no-op elsewhere)."""
    import signal

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: the workers still end with the pool in every normal exit
        return
    if os.getppid() != parent_pid:  # the parent died between fork and prctl
        os._exit(1)


# ---------------------------------------------------------------- building
@dataclass
class BuiltPool:
    pixels: "DiskPool | JpegPool"
    ids: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    skipped: list[tuple[str, str]]
    identity: dict  # pool_identity: what a run records to recognise its pool


def _write_npy_header(path: Path, shape: tuple[int, ...]) -> int:
    """Create `path` as an .npy of uint8 `shape` (sparse, zero-filled) and return the data offset."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape)))
    return offset


def _mean_std(hist: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    values = np.arange(256) / 255.0
    n = np.maximum(hist.sum(1), 1).astype(np.float64)
    mean = hist @ values / n
    std = np.sqrt(np.maximum(hist @ (values * values) / n - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(v, 1e-3)) for v in std)


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def decode_files(root: Path, rels: list[str], *, dest: Path, image_size: int | None, channels: int | None = None,
                 workers: int, label: str, quiet: bool, draft: bool = True, jpeg_quality: int | None = None) -> dict:
    """Pixels of `rels` (relative to root) into `dest` (.npy uint8 [n_ok, S, S, C]), in `workers` processes; with
    `jpeg_quality`, `dest` gets each kept image as JPEG bytes, back to back, in pool order (`encode_jpeg`).

    Without `image_size` a header pass first reads every file's size (and mode): S = 32 when every image is at most
    32 px, else 64. C = 1 when every image is grayscale, else 3 (found by the header pass, or while decoding into a
    3-channel staging file that is then cut to its first channel). Unreadable files are skipped.
    Returns {"kept": [rel...], "skipped": [(rel, reason)...], "image_size", "channels", "mean", "std",
    "sha256": [SHA-256 of each kept file's bytes], "jpeg_sizes": [bytes of each kept image's JPEG] (JPEG only)}."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=quiet, transient=True)
    if len(rels) < 4 * CHUNK:
        workers = 1  # a few hundred files decode faster than worker processes start
    skipped: list[tuple[str, str]] = []
    names = list(rels)
    with bar, Workers(workers) as pool:
        if image_size is None:
            chunks = [rels[i : i + CHUNK] for i in range(0, len(rels), CHUNK)]
            task = bar.add_task(f"reading {label} headers", total=len(rels))
            heads = [h for part in pool.map(peek_chunk, [(str(root), c) for c in chunks],
                                            lambda n: bar.advance(task, n), [len(c) for c in chunks]) for h in part]
            skipped = [(rel, h) for rel, h in zip(rels, heads) if isinstance(h, str)]
            good = [(rel, h) for rel, h in zip(rels, heads) if not isinstance(h, str)]
            if not good:
                return {"kept": [], "skipped": skipped, "image_size": image_size, "channels": channels}
            image_size = 32 if max(max(w, h) for _, (w, h, _) in good) <= 32 else 64
            if channels is None:
                channels = 1 if all(image_mode_is_gray(m) for _, (_, _, m) in good) else 3
            names = [rel for rel, _ in good]
        staged = channels or 3
        staging = dest.with_name(dest.name + ".staging")
        if jpeg_quality is None:
            offset = _write_npy_header(staging, (len(names), image_size, image_size, staged))
            outs = [str(staging)] * len(range(0, len(names), CHUNK))
        else:  # one file of JPEGs per task, joined in order below
            staging.mkdir()
            offset, outs = 0, [str(staging / f"{i:09d}") for i in range(0, len(names), CHUNK)]
        tasks = [(str(root), names[i : i + CHUNK], list(range(i, min(i + CHUNK, len(names)))), image_size, staged,
                  out, offset, draft, jpeg_quality) for i, out in zip(range(0, len(names), CHUNK), outs)]
        task2 = bar.add_task(f"decoding {label} to {image_size}px", total=len(names))
        results = pool.map(decode_chunk, tasks, lambda n: bar.advance(task2, n), [len(t[1]) for t in tasks])
    hist = sum(r[1] for r in results)
    failed = dict(pos_reason for r in results for pos_reason in r[0])
    grays = [g for r in results for g in r[2]]
    hashes = [h for r in results for h in r[3]]
    skipped = sorted(skipped + [(names[p], r) for p, r in failed.items()])
    kept_pos = [p for p in range(len(names)) if p not in failed]
    if channels is None:  # decoded without a header pass: 1 channel only if every kept file is grayscale
        channels = 1 if kept_pos and all(grays[p] for p in kept_pos) else 3
        hist = hist[:channels]
    jpeg_sizes = [b for r in results for b in r[4]]
    if jpeg_quality is not None:  # a failed file wrote no bytes; a gray file is a 1-channel JPEG (no cut needed)
        _join_files([Path(o) for o in outs], dest)
        shutil.rmtree(staging)
    elif failed or channels != staged:  # copy the rows that decoded (and their first channel only, for gray) to dest
        _copy_rows(staging, offset, dest, kept_pos, image_size, staged, channels)
        staging.unlink()
    else:
        os.replace(staging, dest)
    mean, std = _mean_std(hist) if kept_pos else ((), ())
    out = {"kept": [names[p] for p in kept_pos], "skipped": skipped, "image_size": image_size, "channels": channels,
           "mean": mean, "std": std, "sha256": [hashes[p] for p in kept_pos]}
    return out | ({"jpeg_sizes": [jpeg_sizes[p] for p in kept_pos]} if jpeg_quality is not None else {})


def _join_files(parts: list[Path], dest: Path) -> None:
    """The files `parts`, in order, as one file `dest`."""
    with open(dest, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)


def _copy_rows(src_path: Path, src_offset: int, dest: Path, rows: list[int], size: int, src_c: int, c: int) -> None:
    """Rows `rows` of the staging .npy into a new .npy [len(rows), size, size, c] (c <= src_c: the first channels)."""
    dst_offset = _write_npy_header(dest, (len(rows), size, size, c))
    src_row, dst_row = size * size * src_c, size * size * c
    src, dst = os.open(src_path, os.O_RDONLY), os.open(dest, os.O_WRONLY)
    try:
        for new, old in enumerate(rows):
            px = os.pread(src, src_row, src_offset + old * src_row)
            if c != src_c:
                px = np.frombuffer(px, np.uint8).reshape(size, size, src_c)[..., :c].tobytes()
            os.pwrite(dst, px, dst_offset + new * dst_row)
    finally:
        os.close(src)
        os.close(dst)


def _fsync_tree(path: Path) -> None:
    for p in [*path.iterdir(), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode("ascii")).hexdigest()  # JSON escapes every non-ASCII name


def pool_identity(ids: list[str], hashes: list[str] | None) -> dict:
    """The pool's identity: `ids_sha256` over its paths in index order, `content_sha256` over those paths with the
    SHA-256 of each file's bytes (None for a pool built before alssl recorded it)."""
    return {"ids_sha256": _sha256(ids), "content_sha256": None if hashes is None else _sha256([ids, hashes])}


def build_pool(root: Path, pool_dir: Path, *, image_size: int | None, strict: bool, workers: int,
               quiet: bool, expect: dict | None = None, draft: bool = True, pool_format: str | None = None) -> dict:
    """Decode the folder into `pool_dir` (built in `pool_dir.partial`, then renamed: a kill leaves no half pool).

    `pool_format`: raw uint8 rows, JPEG bytes, or auto (None: `pool_format_for`); a run's rebuild (`expect`) uses the
    format the run recorded (raw for runs made before formats existed). With `expect` (a run's record of its pool) a
    pool whose identity differs is refused and discarded, never put in place."""
    fmt = expect.get("pool_format", "raw") if expect is not None else pool_format_for(pool_format, image_size)
    unreadable: list[tuple[str, str]] = []
    files = scan_folder(root, unreadable)
    if not files:
        why = f" ({unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""
        raise UserError(f"{root} holds no images{why} ({', '.join(sorted(e.lstrip('.') for e in IMAGE_EXTS))}, any "
                        f"case, in any subfolder); point --data at the folder with your images")
    partial = pool_dir.with_name(pool_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        res = decode_files(root, [f[0] for f in files], dest=partial / (JPEGS if fmt == "jpeg" else PIXELS),
                           image_size=image_size, workers=workers, label="pool", quiet=quiet, draft=draft,
                           jpeg_quality=JPEG_QUALITY if fmt == "jpeg" else None)
        if not res["kept"]:
            rel, why = res["skipped"][0]
            raise UserError(f"none of the {len(files)} images under {root} could be read (e.g. {rel}: {why}); "
                            f"check that they are image files")
        skipped = sorted(res["skipped"] + unreadable)
        if strict and skipped:
            rel, why = skipped[0]
            raise UserError(f"{root / rel} cannot be read ({why}) and --strict is set; replace or delete it "
                            f"({len(skipped)} unreadable in all), or drop --strict to skip unreadable files")
        manifest = {"format": FORMAT, "root": str(root), "image_size": res["image_size"], "channels": res["channels"],
                    "files": files, "pool": res["kept"], "skipped": skipped, "mean": res["mean"],
                    "std": res["std"], "content_sha256": pool_identity(res["kept"], res["sha256"])["content_sha256"],
                    "pool_format": fmt}
        if fmt == "jpeg":
            manifest["jpeg_quality"] = JPEG_QUALITY
            np.save(partial / OFFSETS, np.concatenate([[0], np.cumsum(res["jpeg_sizes"], dtype=np.int64)]))
        if expect and (problem := identity_problem(manifest, expect)):
            raise UserError(f"the pool rebuilt from {root} is not the one this run was made from ({problem}): its "
                            f"index space would shift and labels would land on other photos; restore the folder's "
                            f"files exactly as they were when the run was made, or start a new run with another "
                            f"--out (the rebuilt pool was discarded)")
        (partial / MANIFEST).write_text(json.dumps(manifest))
        _fsync_tree(partial)
        shutil.rmtree(pool_dir, ignore_errors=True)
        os.replace(partial, pool_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _is_num(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def manifest_problem(m) -> str | None:
    """What is wrong with a loaded manifest.json (keys, types, ranges), or None when it is valid."""
    if not isinstance(m, dict):
        return "not a JSON object"
    keys = ("format", "root", "image_size", "channels", "files", "pool", "skipped", "mean", "std")
    missing = [k for k in keys if k not in m]
    if missing:
        return f"key {missing[0]!r} is missing"
    if m["format"] != FORMAT or type(m["format"]) is not int:
        return f"format is {m['format']!r}, this alssl reads format {FORMAT}"
    if not isinstance(m["root"], str):
        return "root must be a string"
    if type(m["image_size"]) is not int or m["image_size"] < 1:
        return f"image_size must be a positive integer, got {m['image_size']!r}"
    if m["channels"] not in (1, 3) or type(m["channels"]) is not int:
        return f"channels must be 1 or 3, got {m['channels']!r}"
    files, pool, skipped = m["files"], m["pool"], m["skipped"]
    if not isinstance(files, list) or not all(isinstance(f, list) and len(f) == 3 and isinstance(f[0], str)
                                              and type(f[1]) is int and type(f[2]) is int for f in files):
        return "files must be a list of [path, bytes, mtime_ns]"
    if not isinstance(pool, list) or not pool or not all(isinstance(r, str) for r in pool):
        return "pool must be a non-empty list of paths"
    if len(set(pool)) != len(pool):
        return "pool lists a path twice"
    if not isinstance(skipped, list) or not all(isinstance(r, list) and len(r) == 2
                                                and all(isinstance(x, str) for x in r) for r in skipped):
        return "skipped must be a list of [path, reason]"
    for key in ("mean", "std"):
        v = m[key]
        if not isinstance(v, list) or len(v) != m["channels"] or not all(_is_num(x) for x in v):
            return f"{key} must be a list of {m['channels']} finite numbers, got {str(v)[:40]}"
    if any(x <= 0 for x in m["std"]):
        return "std must be positive"
    if not isinstance(m.get("content_sha256"), (str, type(None))):
        return "content_sha256 must be a string"
    if m.get("pool_format", "raw") not in ("raw", "jpeg"):
        return f"pool_format must be raw or jpeg, got {str(m['pool_format'])[:40]!r}"
    return None


def identity_problem(m: dict, expect: dict) -> str | None:
    """How a pool's manifest differs from a run's record of its pool (n, image_size, channels and, for runs made by
    this alssl, ids_sha256 and content_sha256), or None."""
    have = (len(m["pool"]), m["image_size"], m["channels"])
    want = (expect.get("n"), expect.get("image_size"), expect.get("channels"))
    if have != want:
        return (f"{have[0]} images of {have[1]}px with {have[2]} channel(s), the run's has {want[0]} of {want[1]}px "
                f"with {want[2]}")
    if expect.get("ids_sha256") and _sha256(m["pool"]) != expect["ids_sha256"]:
        return "its file names in index order differ from the run's"
    if expect.get("content_sha256") and m.get("content_sha256") != expect["content_sha256"]:
        return "the same number of files, but their names or contents differ from the run's"
    if m.get("pool_format", "raw") != expect.get("pool_format", "raw"):
        return (f"its pixels are stored as {m.get('pool_format', 'raw')}, "
                f"the run's as {expect.get('pool_format', 'raw')}")
    return None


def read_manifest(pool_dir: Path) -> dict:
    """The validated manifest of a built pool; a damaged one is a UserError naming the fix."""
    fix = f"delete {pool_dir} and rerun to rebuild it (the rebuild is checked against the run's record of its photos)"
    try:
        m = json.loads((pool_dir / MANIFEST).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {pool_dir / MANIFEST} ({exc.strerror}); {fix}") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{pool_dir / MANIFEST} is corrupt (not JSON); {fix}") from None
    problem = manifest_problem(m)
    if problem:
        raise UserError(f"{pool_dir / MANIFEST} is damaged ({problem}); {fix}")
    return m


def open_pool(root: Path, pool_dir: Path, *, image_size: int | None, strict: bool, workers: int | None = None,
              quiet: bool = True, expect: dict | None = None, draft: bool = True,
              pool_format: str | None = None) -> tuple[BuiltPool, bool]:
    """The pool of folder `root` kept in `pool_dir`: reused when the folder is unchanged, built when absent
    (`pool_format`: raw | jpeg | auto (None), see `pool_format_for`).

    `expect` (the run's record: n, image_size, channels, ids_sha256, content_sha256) makes a reused or rebuilt pool
    prove it has the run's index space: the same files, in the same order, with the same bytes.
    Returns (pool, built_now)."""
    fix = f"delete {pool_dir} and rerun to rebuild it (the rebuild is checked against the run's record of its photos)"
    pool_format_for(pool_format, image_size)  # a bad value is refused before anything is decoded
    built = not (pool_dir / MANIFEST).is_file() or not ((pool_dir / PIXELS).is_file() or (pool_dir / JPEGS).is_file())
    if built and expect is not None and not root.is_dir():
        raise UserError(f"{pool_dir} (the run's decoded pool) is missing, and rebuilding it needs the source folder "
                        f"{root}, which is not there; put the folder back at {root}, or restore {pool_dir} from a copy "
                        f"of the run")
    if built:
        m = build_pool(root, pool_dir, image_size=image_size, strict=strict, workers=workers or default_workers(),
                       quiet=quiet, expect=expect, draft=draft, pool_format=pool_format)
    else:
        m = read_manifest(pool_dir)
        if expect and (problem := identity_problem(m, expect)):
            raise UserError(f"{pool_dir} is not this run's pool ({problem}); {fix}")
        if image_size is not None and image_size != m["image_size"]:
            raise UserError(f"this run's pool was built at --image-size {m['image_size']} (not {image_size}); "
                            f"rerun with --image-size {m['image_size']} or pick a new --out")
        stored = m.get("pool_format", "raw")
        if pool_format in ("raw", "jpeg") and pool_format != stored:
            raise UserError(f"this run's pool is stored as {stored} (not {pool_format}); rerun with --pool-format "
                            f"{stored} (or auto) or pick a new --out")
        # a run works from its own pool: a folder that moved or is gone is not needed (nor checked); one that is
        # there but changed may no longer match the pool's ids (originals on the page, Label Studio's image paths)
        changed = folder_changes(m["files"], scan_folder(root)) if root.is_dir() else None
        if changed:
            raise UserError(f"{root} changed since this run's pool was built: {changed}; a run's pool index space "
                            f"must not shift, so restore the folder as it was or start a new run with another --out")
    pixels = open_pixels(pool_dir, m)
    want = (len(m["pool"]), m["image_size"], m["image_size"], m["channels"])
    if pixels.shape != want:
        raise UserError(f"{pool_dir / PIXELS} holds images {list(pixels.shape)} but its manifest says "
                        f"{list(want)}; {fix}")
    return BuiltPool(pixels=pixels, ids=list(m["pool"]), mean=tuple(m["mean"]), std=tuple(m["std"]),
                     image_size=int(m["image_size"]), skipped=[tuple(s) for s in m["skipped"]],
                     identity=pool_identity(m["pool"], None) | {"content_sha256": m.get("content_sha256"),
                                                                "pool_format": m.get("pool_format", "raw")}), built


# ---------------------------------------------------------------- classes and the labeled test folder
def parse_classes(text: str) -> list[str]:
    """`a,b,c` or `@file.txt` (one name per line; blank lines and `#` comments ignored) -> class names."""
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read class list {path} ({type(exc).__name__}); give a UTF-8 text file with one "
                            f"class name per line") from None
        names = [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]
    else:
        names = [c.strip() for c in text.split(",")]
        if any(not c for c in names):
            raise UserError(f"--classes {text!r} has an empty name; write them like --classes cat,dog,bird")
    if not names:
        raise UserError(f"--classes {text!r} names no class; "
                        "write them like --classes cat,dog or --classes @classes.txt")
    if "__skip__" in names:
        raise UserError("--classes may not name a class __skip__: that label marks an image as \"none of these\" "
                        "(skipped); rename the class")
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise UserError(f"--classes repeats {', '.join(dup)}; give each class once")
    return names


def test_folder_classes(test_dir: Path) -> list[str]:
    """Sorted class subfolders of a labeled test folder (ImageFolder layout)."""
    if not test_dir.is_dir():
        raise UserError(f"--test {test_dir} is not a folder; give a folder with one subfolder of images per class")
    names = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise UserError(f"--test {test_dir} has no class subfolders; put each class's images in {test_dir}/<class>/")
    return names


def resolve_classes(classes: list[str] | None, test_dir: Path | None) -> list[str]:
    """The class list in logit order: --classes when given (the test folder's classes must be among them),
    else the test folder's sorted subfolders, else [] (an unlabeled pool with no classes yet)."""
    found = test_folder_classes(test_dir) if test_dir is not None else None
    if classes is None:
        return found or []
    if found is not None:
        extra = [c for c in found if c not in classes]
        if extra:
            hint = suggest(extra[0], classes)
            raise UserError(f"--test {test_dir} has class folder(s) {', '.join(extra)} that are not in --classes "
                            f"({', '.join(classes)}){hint}; make the two agree")
    return list(classes)


def load_test_folder(test_dir: Path, pool_dir: Path, *, classes: list[str], image_size: int, channels: int,
                     workers: int | None = None, quiet: bool = True,
                     draft: bool = True) -> tuple[np.ndarray, np.ndarray, list]:
    """Labeled test images (uint8 [M, S, S, C], int64 [M]) cached in `pool_dir/test.npz`; rebuilt when the test
    folder changed. Returns (x, y, skipped (abs path, reason))."""
    files = []
    for k, c in enumerate(classes):
        if (test_dir / c).is_dir():
            files += [(f"{c}/{rel}", size, mtime, k) for rel, size, mtime in scan_folder(test_dir / c)]
    scan = [f[:3] for f in files]
    cache = pool_dir / TEST
    moved = not test_dir.is_dir()  # the test folder moved or is gone: the run's decoded copy is used as it is
    try:  # the cache is used only when it is whole and of this folder; anything else is rebuilt from the folder
        with np.load(cache, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
            ok = ((moved or json.loads(str(f["scan"])) == [list(s) for s in scan]) and x.dtype == np.uint8
                  and x.shape[1:] == (image_size, image_size, channels) and y.dtype.kind in "iu"
                  and y.shape == (len(x),) and (len(y) == 0 or 0 <= y.min() <= y.max() < len(classes)))
            if ok:
                return x, y.astype(np.int64), [tuple(s) for s in json.loads(str(f["skipped"]))]
    except Exception:  # noqa: BLE001 - a missing, garbage or foreign cache file (BadZipFile, ValueError, ...)
        pass
    if moved:
        raise UserError(f"the test folder {test_dir} is not there and the run has no decoded copy of it ({cache}); put "
                        f"the folder back at {test_dir}")
    if not files:
        raise UserError(f"--test {test_dir} holds no images in its class subfolders; add images or drop --test")
    tmp = pool_dir / "test-pixels.npy"
    res = decode_files(test_dir, [f[0] for f in files], dest=tmp, image_size=image_size, channels=channels,
                       workers=workers or default_workers(), label="test", quiet=quiet, draft=draft)
    if not res["kept"]:
        tmp.unlink(missing_ok=True)
        raise UserError(f"none of the {len(files)} test images under {test_dir} could be read; check the test folder")
    label_of = {f[0]: f[3] for f in files}
    x = np.load(tmp)
    tmp.unlink(missing_ok=True)
    y = np.array([label_of[r] for r in res["kept"]], np.int64)
    skipped = [(str(test_dir / r), why) for r, why in res["skipped"]]
    from alssl.runs import atomic_write_bytes  # (imports torch: not at module level, worker processes import this)

    buf = io.BytesIO()
    np.savez(buf, x=x, y=y, scan=json.dumps([list(s) for s in scan]), skipped=json.dumps(skipped))
    atomic_write_bytes(cache, buf.getvalue())
    return x, y, skipped
