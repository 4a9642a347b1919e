"""The run directory: atomic writes, the labeled pool (one absolute index space), a process lock.

A run dir holds `run.toml` (what made it, human readable), `state.json` (the pool and its rounds),
`checkpoints/`, `features/`, `metrics.jsonl` and `queries/`. Every file is written to a temp file in
the same directory, fsynced and moved into place with `os.replace`, so a `kill -9` leaves either the
old or the new file, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alssl.errors import UserError

FORMAT_VERSION = 1
UNLABELED = -1


# ---------------------------------------------------------------- atomic file I/O
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same dir + fsync + os.replace)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror}); choose a writable directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if os.environ.get("ALSSL_FAULT_DISK_FULL"):  # fault injection for the tests (alssl/faults.py)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise UserError(f"cannot write {path} ({exc.strerror}); free disk space or fix permissions, then rerun (nothing was changed)") from None
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into memory, then an atomic write: a killed save never leaves a truncated checkpoint."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line; the whole file is rewritten atomically (metrics files are small)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def torch_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint with `weights_only=True`; a truncated, corrupt or unsafe file becomes a UserError.

    `weights_only=True` means the unpickler only rebuilds tensors and plain containers, so a planted
    malicious pickle cannot run code: it fails here and the user gets one `error:` line.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; run `alssl pretrain` first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means a bad file
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint {path} cannot be loaded safely ({reason}); delete it and rerun the command that wrote it"
        ) from None


def toml_dumps(data: dict, _prefix: str = "") -> str:
    """A small TOML writer for flat/nested dicts of str, int, float, bool and lists of those (tomllib only reads)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))  # JSON string escapes are valid TOML basic strings

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{_prefix}{k}]", toml_dumps(v, f"{_prefix}{k}.")]
    return "\n".join(lines).strip("\n") + "\n"


# ---------------------------------------------------------------- the run dir
class Run:
    """A run directory and its pool state.

    `state["labeled_round"][i]` is -1 for an unlabeled pool sample and k ≥ 0 when sample i was labeled
    in round k; `state["labels"][i]` is its label (-1 when unlabeled). Indices are absolute training-pool
    indices everywhere (one index space).
    """

    def __init__(self, path: Path, state: dict):
        self.path = path
        self.state = state

    # -- creation / opening
    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / "state.json").exists()

    @classmethod
    def create(cls, path: str | os.PathLike, *, n_pool: int, config: dict) -> "Run":
        """Create a new run dir (`run.toml` + `state.json`); refuses to overwrite another run."""
        path = Path(path)
        if cls.exists(path):
            raise UserError(f"{path} already holds a run; pick another --out or delete it")
        state = {
            "format_version": FORMAT_VERSION,
            "config": config,
            "n_pool": n_pool,
            "labeled_round": [UNLABELED] * n_pool,
            "labels": [UNLABELED] * n_pool,
            "rounds": [],
            "open_query": None,
            "stages": {},
        }
        run = cls(path, state)
        check_writable(path)
        atomic_write_text(path / "run.toml", toml_dumps({"alssl_format": FORMAT_VERSION, **config}))
        run.save_state()
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"run dir {path} does not exist; create it with `alssl pretrain --out {path}`")
        sfile = path / "state.json"
        if not sfile.exists():
            raise UserError(f"{path} is not an alssl run dir (no state.json); create one with `alssl pretrain --out DIR`")
        try:
            state = json.loads(sfile.read_text())
            version = int(state["format_version"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise UserError(f"{sfile} is corrupt (not alssl run state); restore it or start a new run") from None
        if version > FORMAT_VERSION:
            raise UserError(
                f"{path} was written by a newer alssl (run format {version}, this alssl reads ≤ {FORMAT_VERSION}); "
                "upgrade alssl with `pip install -U alssl`"
            )
        return cls(path, state)

    def save_state(self) -> None:
        atomic_write_text(self.path / "state.json", json.dumps(self.state, indent=1))

    # -- the pool
    @property
    def config(self) -> dict:
        return self.state["config"]

    @property
    def labeled_round(self) -> np.ndarray:
        return np.asarray(self.state["labeled_round"], dtype=np.int64)

    @property
    def labeled_mask(self) -> np.ndarray:
        return self.labeled_round >= 0

    @property
    def labeled_indices(self) -> np.ndarray:
        return np.flatnonzero(self.labeled_mask)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.state["labels"], dtype=np.int64)

    @property
    def n_rounds(self) -> int:
        return len(self.state["rounds"])

    def add_labels(self, indices: np.ndarray, labels: np.ndarray, *, round_meta: dict) -> None:
        """Record one finished round (in memory; call save_state to persist)."""
        k = self.n_rounds
        for i, y in zip(indices.tolist(), labels.tolist()):
            assert self.state["labeled_round"][i] == UNLABELED, f"index {i} labeled twice"
            self.state["labeled_round"][i] = k
            self.state["labels"][i] = int(y)
        self.state["rounds"].append({"round": k, "n": int(len(indices)), **round_meta})

    # -- files
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def log_metrics(self, record: dict) -> None:
        append_jsonl(self.metrics_file, record)


def check_writable(path: Path) -> None:
    """Fail early, as a UserError, when `path` cannot be created or written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {path} ({exc.strerror}); choose a writable --out directory") from None


# ---------------------------------------------------------------- locking
@contextlib.contextmanager
def run_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a run dir for the duration of a command.

    `flock` on `RUN/.lock`: the kernel drops it when the holder dies (even by kill -9), so a stale lock
    file of a dead process is simply taken over. A live holder makes us fail with its pid. The lock file
    is removed on exit, so a refused or failed command leaves the run dir as it found it.
    """
    path = Path(path)
    if not path.exists() or int(os.environ.get("LOCAL_RANK", "0")) > 0:  # DDP ranks > 0 run under rank 0's lock
        yield
        return
    lock = path / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(
                f"run dir {path} is in use by another alssl process (pid {holder}); wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
    finally:
        os.close(fd)
