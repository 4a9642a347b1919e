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
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

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
        if isinstance(exc, OSError) and exc.errno in (errno.EISDIR, errno.ENOTDIR):
            raise UserError(f"cannot write {path}: a directory is in the way; "
                            "move it away and rerun (nothing was changed)") from None
        if (err := disk_error(exc, path)) is not None:
            raise err from None
        raise
    fsync_dir(path.parent)


def disk_error(exc: BaseException, path: Path) -> UserError | None:
    """The UserError for a write that failed for want of space or permission (None for any other failure)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"cannot write {path} ({exc.strerror}); free disk space or fix permissions, then rerun "
                         f"(nothing was changed)")
    return None


def fsync_dir(path: Path) -> None:
    """Make a rename into directory `path` durable (best effort: some filesystems refuse to fsync a directory)."""
    with contextlib.suppress(OSError):
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8; a file name that is not UTF-8 (held by Python as surrogate escapes) is written as its own bytes, and
    read back exactly with `errors="surrogateescape"`."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save into memory, then an atomic write: a killed save never leaves a truncated checkpoint."""
    import torch  # here, not at the top: `alssl status` and state checks need no torch (fast startup)

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line by rewriting the whole file atomically (metrics files are small), so it cannot tear.

    A torn last line left by an older writer (or a hand edit) is closed with a newline first: the new record always
    starts on a line of its own, and the reader skips the torn one.
    """
    path = Path(path)
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = b""
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror}); move it away and rerun") from None
    if old and not old.endswith(b"\n"):
        old += b"\n"
    atomic_write_bytes(path, old + (json.dumps(record, sort_keys=True) + "\n").encode())


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace a JSONL file with `records`, one per line (atomic)."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


class DamagedFileWarning(UserWarning):
    """A run-dir file had unreadable parts that were skipped (the rest was used)."""


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON-object lines of `path` ([] when it does not exist). Never raises on a bad line: a torn tail (a crash
    mid-append) or a garbled / non-UTF-8 / non-object line is skipped and reported with one DamagedFileWarning."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        warnings.warn(f"cannot read {path} ({exc.strerror}); its records are ignored", DamagedFileWarning, stacklevel=2)
        return []
    records, bad = [], []
    for no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad.append(no)
    if bad:
        where = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line{'s' if len(bad) > 1 else ''} "
                      f"(line {where}: torn by a crash or edited by hand); the other records are used",
                      DamagedFileWarning, stacklevel=2)
    return records


def torch_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint with `weights_only=True`; a truncated, corrupt or unsafe file becomes a UserError.

    `weights_only=True` means the unpickler only rebuilds tensors and plain containers, so a planted
    malicious pickle cannot run code: it fails here and the user gets one `error:` line.
    """
    import torch

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


# ---------------------------------------------------------------- the state.json schema
ROUND_KEYS = {"round": int, "n": int, "strategy": str, "budget": str, "source": str}  # what `alssl status` shows
OPEN_QUERY_KEYS = {"round": int, "file": str, "indices": list, "budget": str, "strategy": str, "seed": int,
                   "probe": str}


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass; JSON true must not pass as 1


def _int_list_problem(name: str, v: Any, n: int, lo: int, hi: int) -> str | None:
    if not isinstance(v, list) or len(v) != n:
        return f"{name} must be a list of {n} integers (one per pool sample)"
    bad = next((i for i, x in enumerate(v) if not _is_int(x) or not lo <= x <= hi), None)
    return None if bad is None else f"{name}[{bad}] = {v[bad]!r} is not an integer in {lo}..{hi}"


def state_problem(state: Any) -> str | None:
    """What is wrong with a loaded state.json (types, ranges, keys, cross-references), or None when it is valid."""
    if not isinstance(state, dict):
        return "not a JSON object"
    v = state.get("format_version")
    if not _is_int(v) or v < 1:
        return f"format_version must be a positive integer, got {v!r}"
    for key, kind in (("n_pool", int), ("labeled_round", list), ("labels", list), ("rounds", list),
                      ("config", dict), ("stages", dict)):
        if key not in state:
            return f"key {key!r} is missing"
        if not (_is_int(state[key]) if kind is int else isinstance(state[key], kind)):
            return (f"{key} must be a{'n' if kind is int else ''} "
                    f"{'integer' if kind is int else 'JSON ' + ('array' if kind is list else 'object')}")
    n = state["n_pool"]
    if n < 1:
        return f"n_pool must be at least 1, got {n}"
    rounds = state["rounds"]
    for k, r in enumerate(rounds):
        if not isinstance(r, dict):
            return f"rounds[{k}] must be an object"
        for key, kind in ROUND_KEYS.items():
            if key not in r:
                return f"rounds[{k}] lacks key {key!r}"
            if not (_is_int(r[key]) if kind is int else isinstance(r[key], kind)):
                return f"rounds[{k}].{key} must be {'an integer' if kind is int else 'a string'}, got {r[key]!r}"
        if r["round"] != k:
            return f"rounds[{k}].round is {r['round']} (must be {k})"
        if "skipped" in r and not isinstance(r["skipped"], list):
            return f"rounds[{k}].skipped must be a list of pool indices (the images skipped in round {k})"
    if (p := _int_list_problem("labeled_round", state["labeled_round"], n, -1, len(rounds) - 1)):
        return p + " (-1 = unlabeled, k = labeled in round k)"
    if (p := _int_list_problem("labels", state["labels"], n, -1, 2**31 - 1)):
        return p
    lr, labels = state["labeled_round"], state["labels"]
    bad = next((i for i in range(n) if (lr[i] >= 0) != (labels[i] >= 0)), None)
    if bad is not None:
        return f"sample {bad} has labeled_round {lr[bad]} but label {labels[bad]} (both -1, or both set)"
    counts = [0] * len(rounds)
    for k in lr:
        if k >= 0:
            counts[k] += 1
    for k, r in enumerate(rounds):
        if r["n"] != counts[k]:
            return f"rounds[{k}].n is {r['n']} but {counts[k]} samples are labeled in round {k}"
    skipped: set[int] = set()
    for k, r in enumerate(rounds):  # optional (runs made before skips have none): pool indices, unlabeled, once
        for i in r.get("skipped", []):
            if not _is_int(i) or not 0 <= i < n:
                return f"rounds[{k}].skipped holds {i!r}, not a pool index in 0..{n - 1}"
            if lr[i] >= 0 or i in skipped:
                return f"rounds[{k}].skipped holds {i}, which is {'labeled' if lr[i] >= 0 else 'skipped twice'}"
            skipped.add(i)
    data = state["config"].get("data")
    if not isinstance(data, dict) or not isinstance(data.get("spec"), str) or not data["spec"]:
        return "config.data.spec (the data SPEC the run was made from) is missing"
    for name, st in state["stages"].items():
        if not isinstance(st, dict):
            return f"stages.{name} must be an object"
    q = state.get("open_query")
    if q is not None:
        if not isinstance(q, dict):
            return "open_query must be null or an object"
        for key, kind in OPEN_QUERY_KEYS.items():
            if key not in q:
                return f"open_query lacks key {key!r}"
            if not (_is_int(q[key]) if kind is int else isinstance(q[key], kind)):
                return f"open_query.{key} has the wrong type ({q[key]!r})"
        if q["round"] != len(rounds):
            return f"open_query.round is {q['round']} but {len(rounds)} rounds are done (must be {len(rounds)})"
        idx = q["indices"]
        bad = next((i for i in idx if not _is_int(i) or not 0 <= i < n), None)
        if bad is not None or not idx:
            return (f"open_query.indices must be pool indices in 0..{n - 1}"
                    + (f" (found {bad!r})" if idx else " (found none)"))
        if len(set(idx)) != len(idx):
            return "open_query.indices has duplicates"
        done = next((i for i in idx if lr[i] >= 0 or i in skipped), None)
        if done is not None:
            return f"open_query.indices holds {done}, which is already {'labeled' if lr[done] >= 0 else 'skipped'}"
    return None


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
        """Open a run dir; a missing, unreadable, damaged or newer `state.json` is a UserError naming the fix."""
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"run dir {path} does not exist; create it with `alssl pretrain --out {path}`")
        sfile = path / "state.json"
        if not sfile.exists():
            raise UserError(f"{path} is not an alssl run dir (no state.json); "
                            "create one with `alssl pretrain --out DIR`")
        if not sfile.is_file():
            raise UserError(f"{sfile} is not a file; move it away and restore the run's state.json, or start a new run")
        try:
            state = json.loads(sfile.read_bytes().decode("utf-8"))
        except OSError as exc:
            raise UserError(f"cannot read {sfile} ({exc.strerror}); fix its permissions and rerun") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise UserError(f"{sfile} is corrupt (not alssl run state); restore it or start a new run") from None
        version = state.get("format_version") if isinstance(state, dict) else None
        if _is_int(version) and version > FORMAT_VERSION:
            raise UserError(
                f"{path} was written by a newer alssl (run format {version}, this alssl reads ≤ {FORMAT_VERSION}); "
                "upgrade alssl with `pip install -U alssl`"
            )
        problem = state_problem(state)
        if problem:
            raise UserError(f"{sfile} is damaged ({problem}); restore it from a backup, or start a new run with "
                            "`alssl pretrain --out NEW_DIR`")
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

    @property
    def skipped_mask(self) -> np.ndarray:
        """Images a person skipped ("none of these", `rounds[k].skipped`): not labeled, never queried again."""
        mask = np.zeros(self.state["n_pool"], dtype=bool)
        for r in self.state["rounds"]:
            mask[np.asarray(r.get("skipped", []), dtype=np.int64)] = True
        return mask

    def add_labels(self, indices: np.ndarray, labels: np.ndarray, *, round_meta: dict) -> None:
        """Record one finished round (in memory; call save_state to persist). A label of -1 (UNLABELED) records the
        image as skipped in this round (`rounds[k].skipped`, listed only when there are any)."""
        k = self.n_rounds
        skipped, done = [], self.skipped_mask
        for i, y in zip(indices.tolist(), labels.tolist()):
            assert self.state["labeled_round"][i] == UNLABELED and not done[i], f"index {i} labeled twice"
            if y == UNLABELED:
                skipped.append(i)
                continue
            self.state["labeled_round"][i] = k
            self.state["labels"][i] = int(y)
        self.state["rounds"].append({"round": k, "n": int(len(indices)) - len(skipped), **round_meta,
                                     **({"skipped": sorted(skipped)} if skipped else {})})

    # -- the schema: other modules ask the run, they do not index its state
    @property
    def n_pool(self) -> int:
        return int(self.state["n_pool"])

    @property
    def data_config(self) -> dict:
        """run.toml's [data]: spec, imbalance, seed, and for image folders test, classes, image_size, pool, ..."""
        return self.config["data"]

    @property
    def rounds(self) -> list[dict]:
        return self.state["rounds"]

    @property
    def stages(self) -> dict:
        return self.state["stages"]

    @property
    def open_query(self) -> dict | None:
        """The query waiting for labels ({round, strategy, budget, seed, indices, file, ...}), or None."""
        return self.state["open_query"]

    @open_query.setter
    def open_query(self, value: dict | None) -> None:
        self.state["open_query"] = value

    def require_labels(self, then: str = "") -> np.ndarray:
        """The labeled pool indices; none is a UserError naming how to get some (`then`: what they are for)."""
        idx = self.labeled_indices
        if len(idx) == 0:
            why = f", so there is no {then}" if then else ""
            raise UserError(f"{self.path} has no labels yet{why}; label some images first "
                            f"(`alssl query {self.path} --budget 2%`, then `alssl label {self.path} --from FILE.csv`, "
                            "or --oracle on a benchmark)")
        return idx

    def classes_are_new(self, dataset, given: list[str] | None) -> bool:
        """Whether `given` (a class list asked for, or None) is new to the run, i.e. the run has none yet. A run's class
        list is set once (stored with the first import) and never changes: another list is a UserError."""
        if given is None:
            return False
        if dataset.classes and list(given) != list(dataset.classes):
            raise UserError(f"{self.path} already has classes {', '.join(dataset.classes)}; drop --classes (the class "
                            f"list of a run cannot change once set)")
        return not dataset.classes

    def set_classes(self, dataset, names: list[str] | None) -> None:
        """The run's class list (and its dataset's), or None to take it back (in memory: `save_state`/`save_config`)."""
        dataset.classes = list(names or [])
        if names is None:
            self.data_config.pop("classes", None)
        else:
            self.data_config["classes"] = list(names)

    def save_config(self) -> None:
        """run.toml, the human-readable copy of the run's config (state.json holds it too: `save_state`)."""
        atomic_write_text(self.path / "run.toml",
                          toml_dumps({"alssl_format": self.state["format_version"], **self.config}))

    def record_stage(self, name: str, summary: dict) -> dict:
        """Keep a stage's summary (its scalar values) in state.json for `alssl status`; returns what was kept."""
        kept = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
        self.state["stages"][name] = kept
        self.save_state()
        return kept

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


# ---------------------------------------------------------------- outputs
def run_dir_around(path: Path) -> Path | None:
    """The alssl run dir (holding state.json and run.toml) that is `path` or holds it, or None."""
    for p in [path, *path.parents]:
        if (p / "state.json").is_file() and (p / "run.toml").is_file():
            return p
    return None


def data_inputs(data: dict) -> list[Path]:
    """The files and folders a run's data section reads: the SPEC's file or folder (not `digits`) and --test."""
    spec = str(data.get("spec", ""))
    out = [] if spec == "digits" else [Path(spec[len("cifar10:"):] if spec.startswith("cifar10:") else spec)]
    return out + ([Path(data["test"])] if data.get("test") else [])


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing, unreadable or not JSON: for "did alssl write this?" checks."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def check_output(out: Path, *, names: list[str] | None, is_previous, inputs: list[Path], force: bool,
                 what: str) -> None:
    """Refuse an `--out` that would overwrite a run's file, an input, or a file that is not `what` from an earlier
    run of the same command (that last one only without `force`).

    `names`: the files written inside the folder `out` (None: `out` is the file written). `is_previous(out)`: True
    when what is there now was written by the same command. Nothing is written here."""
    target = Path(out).expanduser().resolve()
    run = run_dir_around(target)
    if run is not None:
        raise UserError(f"--out {out} is inside the run dir {run}, whose files alssl owns; write {what} outside "
                        f"run dirs (nothing was changed)")
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if target == src or src in target.parents:
            raise UserError(f"--out {out} would write {what} into an input ({src}); pick an --out outside the "
                            f"data, e.g. next to it (nothing was changed)")
    paths = [target] if names is None else [target / n for n in names]
    there = next((p for p in paths if os.path.lexists(p)), None)
    if there is not None and not force and not is_previous(target):
        raise UserError(f"{there} exists and is not {what} written by alssl; pick another --out, or add --force to "
                        f"replace it (nothing was changed)")


# ---------------------------------------------------------------- locking
class RunBusy(UserError):
    """`run_lock` waited in vain: another alssl process holds the run (the labeling page answers 503 with it)."""


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, *, wait: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on a run dir for the duration of a command.

    `flock` on `RUN/.lock`: the kernel drops it when the holder dies (even by kill -9), so a stale lock
    file of a dead process is simply taken over. A live holder is waited for up to `wait` seconds (default
    `ALSSL_LOCK_WAIT`, 5 s: two quick commands on one run take turns), then we fail with its pid. The lock file
    is removed on exit, so a refused or failed command leaves the run dir as it found it; a process that opened
    the file just before it was removed notices (another inode is now at the path, or none) and opens it again,
    so two processes can never both believe they hold the lock.
    """
    path = Path(path)
    from alssl.devices import global_zero

    if not path.exists() or not global_zero():  # DDP ranks > 0 (other nodes too) run under global rank 0's lock
        yield
        return
    lock = path / ".lock"
    wait = float(os.environ.get("ALSSL_LOCK_WAIT", "5")) if wait is None else wait
    deadline = time.monotonic() + wait
    while True:
        fd = _open_lock_file(lock, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise RunBusy(f"run dir {path} is in use by another alssl process (pid {holder}); wait for it to "
                              "finish or stop it") from None
            time.sleep(0.05)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our flock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
    finally:
        os.close(fd)


def _open_lock_file(lock: Path, path: Path) -> int:
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except IsADirectoryError:
        raise UserError(f"{lock} is a directory, not alssl's lock file; remove it (rmdir {lock}) and rerun") from None
    except OSError as exc:  # EACCES / EPERM / EROFS: a run dir of another user, or read-only
        if exc.errno == errno.ELOOP:
            raise UserError(f"{lock} is a symbolic link, not alssl's lock file; remove it and rerun") from None
        raise UserError(f"cannot lock run dir {path} ({exc.strerror} on {lock}); run alssl as the user who owns it, "
                        "or copy the run to a directory you can write") from None
