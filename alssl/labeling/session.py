"""The labeling session behind `alssl label-ui`: the open query, its labels so far, submit, and the next query.

How the server shares the run with other alssl commands (docs/labeling.md):

- It does **not** hold the run lock while it waits for clicks, so `alssl status`, `alssl probe` and the rest keep
  working while the page is open.
- Every label is written at once to `RUN/queries/round-K.partial.csv` (header `index,id,label`, the same format
  `alssl label --from` reads) by an atomic replace, under an exclusive `flock` on `RUN/queries/`: two servers, or
  two tabs, never lose each other's labels, and a crash or `kill -9` loses nothing that was acknowledged.
- Submit, and opening the next query, take the run lock (`run_lock(wait=...)`: a few seconds for a command that holds
  it, then answering 503), re-read `state.json` under it, and import through `rounds.import_labels`: exactly the
  validation and code path of `alssl label RUN --from round-K.partial.csv` (`rounds.close_round`). A round that is no
  longer open is never imported again (a second Submit, or another tab, gets the first import's summary).
- The run lock is not held while labels are saved (a long command would stall every click): the partial file has its
  own short lock, `queries_lock`, a `flock` on `RUN/queries/` itself.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from alssl.errors import UserError, warn
from alssl.labeling.files import SKIP
from alssl.labeling.images import downscaled, png

KEYS = "123456789abcdefghijklmnopqrstuvwxyz"
SKIP_KEYS = "x0."  # the page's "none of these" key: the first one no class uses
LOCK_WAIT_S = 10.0  # how long a submit waits for another command's run lock before answering 503
# A suggestion is pre-selected (Enter accepts it; Label Studio pre-fills it) only when the model is at least this
# confident AND its measured accuracy (test split, or cross-validation on the labels) is at least this: a weak early
# model's softmax is over-confident (measured: a 40-label CIFAR model, 18 % accurate, was right on 24 % of its
# >= 0.8-confident guesses), and a pre-filled wrong answer anchors the labeler. docs/labeling.md has the numbers.
SUGGEST_MIN = 0.8


def preselected(score: float | None, model: dict | None) -> bool:
    """Whether a suggestion of this confidence, from a model with this record, is pre-selected."""
    acc = (model or {}).get("accuracy")
    return score is not None and score >= SUGGEST_MIN and acc is not None and acc >= SUGGEST_MIN


def class_keys(classes: list[str]) -> list[str | None]:
    """The keyboard shortcut of each class: 1-9, then a-z (none past the 35th class). Classes that are all single
    keys themselves (digits 0-9, letters) keep their own key, so "0" is labeled with 0, not 1."""
    low = [c.lower() for c in classes]
    if all(len(c) == 1 and (c in KEYS or c == "0") for c in low) and len(set(low)) == len(low):
        return low
    return [KEYS[k] if k < len(KEYS) else None for k in range(len(classes))]


def skip_key(keys: list[str | None]) -> str:
    """The key of the page's "none of these" choice: x, else 0, else . (whichever no class uses)."""
    return next(k for k in SKIP_KEYS if k not in keys)


def partial_path(run_dir: Path, round_k: int) -> Path:
    return Path(run_dir) / "queries" / f"round-{round_k}.partial.csv"


def partial_csv(labels: dict[int, str], order: list[int], ids: list[str]) -> str:
    """The partial label file: header index,id,label; the labeled rows of the query in query order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "id", "label"])
    w.writerows([i, ids[i], labels[i]] for i in order if i in labels)
    return buf.getvalue()


def read_partial(path: Path, indices: list[int]) -> dict[int, str]:
    """{index: label} from a partial file, keeping only rows of this query (the file is ours: a row that does not
    fit is skipped with a warning rather than stopping the page; Submit validates everything again)."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        warn(f"cannot read {path} ({type(exc).__name__}); starting with no labels for this round")
        return {}
    wanted, out, bad = set(indices), {}, 0
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error:
        rows, bad = [], 1
    for row in rows[1:]:
        if len(row) == 3 and row[0].strip().isascii() and row[0].strip().isdigit() and int(row[0]) in wanted \
                and row[2].strip():
            out[int(row[0])] = row[2].strip()
        elif any(c.strip() for c in row):
            bad += 1
    if bad:
        warn(f"{path}: ignored {bad} row(s) that are not labels of this query")
    return out


@contextlib.contextmanager
def queries_lock(run_dir: Path):
    """Exclusive flock on RUN/queries/ (the directory itself: no extra lock file): serializes partial-file writes
    and submits across threads and processes. Held for milliseconds."""
    d = Path(run_dir) / "queries"
    d.mkdir(exist_ok=True)
    fd = os.open(d, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def source_of(round_rec: dict, run_dir: Path) -> Path | None:
    """The label file a round was imported from, as an absolute path (sources inside the run are kept relative)."""
    src = round_rec.get("source")
    return None if not src or src == "oracle" else (Path(run_dir) / src).resolve()


class LabelSession:
    """One run's labeling: thread-safe, shared by every request of one server."""

    def __init__(self, run_dir: Path, dataset, *, classes: list[str], store: bool = False):
        self.run_dir = Path(run_dir)
        self.dataset = dataset
        self.classes = list(classes)
        self.store = store  # the run has no class list yet: store `classes` with the first import
        self.mutex = threading.RLock()
        self.query: dict = {}
        self.position: dict[int, int] = {}
        self.suggested: dict[int, tuple[str, float]] = {}
        self.model: dict | None = None  # the suggesting model's record (accuracy, accuracy_on, n_labeled)
        self.result: dict | None = None  # the import summary once this round is submitted
        self._state_key: tuple | None = None
        self._open_on_disk: dict | None = None
        self._images: OrderedDict[int, tuple[bytes, str]] = OrderedDict()
        self.pool_root: Path | None = None
        self.pixelated = True

    # ------------------------------------------------------------ loading
    def load(self, run) -> None:
        """Adopt the run's open query (call under the run lock, with a freshly opened Run)."""
        from alssl.rounds import require_open_query

        open_q = require_open_query(run, then=f"alssl label-ui {run.path}")
        cfg = run.data_config
        # an image folder's originals when the folder is still there (a moved run shows its pool pixels)
        self.pool_root = Path(cfg["spec"]) if cfg.get("pool") and Path(cfg["spec"]).is_dir() else None
        self.pixelated = self.pool_root is None  # array datasets: pool pixels, tiny, shown nearest-neighbour
        self.query = dict(open_q)
        self.position = {int(i): j for j, i in enumerate(open_q["indices"])}
        self.suggested, self.model = {}, None
        if run.labeled_mask.any():  # (torch only for a run with labels: a model to suggest)
            from alssl.models import model_suggestions

            self.suggested, self.model = model_suggestions(run, self.dataset, [int(i) for i in open_q["indices"]])
        self.result = None
        self._images.clear()

    @property
    def indices(self) -> list[int]:
        return [int(i) for i in self.query["indices"]]

    @property
    def round(self) -> int:
        return int(self.query["round"])

    @property
    def partial(self) -> Path:
        return partial_path(self.run_dir, self.round)

    def labels(self) -> dict[int, str]:
        return read_partial(self.partial, self.indices)

    def _open_query_on_disk(self) -> dict | None:
        """state.json's open query, re-read only when the file changed (it is replaced atomically, so a read
        without the lock sees a whole file)."""
        from alssl.runs import state_problem

        sfile = self.run_dir / "state.json"
        fix = "restore it (or rerun `alssl label-ui`), then reload the page"
        try:
            st = sfile.stat()
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key != self._state_key:
                state = json.loads(sfile.read_bytes().decode("utf-8"))
                problem = state_problem(state)
                if problem:
                    raise UserError(f"{sfile} is damaged ({problem}); {fix}")
                self._open_on_disk = state["open_query"]
                self._state_key = key
        except OSError as exc:
            raise UserError(f"cannot read {sfile} ({exc.strerror}); {fix}") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise UserError(f"{sfile} is corrupt (not alssl run state); {fix}") from None
        return self._open_on_disk

    def is_open(self) -> bool:
        oq = self._open_query_on_disk()
        return oq is not None and int(oq["round"]) == self.round and [int(i) for i in oq["indices"]] == self.indices

    # ------------------------------------------------------------ the API
    def payload(self, image_url) -> dict:
        """GET /api/query: the round, the classes and every item with its suggestion and current label."""
        with self.mutex:
            labels = self.labels()
            status = "open" if self.is_open() else ("imported" if self.result else "closed")
            items = []
            for i in self.indices:
                s = self.suggested.get(i)
                items.append({"index": i, "id": self.dataset.ids[i], "image": image_url(i),
                              "suggestion": s[0] if s else None, "score": s[1] if s else None,
                              "preselect": preselected(s[1] if s else None, self.model), "label": labels.get(i)})
            keys = class_keys(self.classes)
            return {"round": self.round, "classes": self.classes, "keys": keys, "items": items,
                    "skip": {"label": SKIP, "key": skip_key(keys)},
                    "model": None if self.model is None else {**self.model, "suggest_min": SUGGEST_MIN},
                    "status": status,
                    "labeled": sum(1 for i in self.indices if i in labels), "total": len(self.indices),
                    "pixelated": self.pixelated, "result": self.result,
                    "next": {"budget": self.query["budget"], "strategy": self.query["strategy"]},
                    "run": str(self.run_dir), "file": str(self.partial)}

    def set_label(self, index, label) -> tuple[int, dict]:
        """POST /api/label {"index": i, "label": "dog"} (label null clears it: the page's undo)."""
        if isinstance(index, bool) or not isinstance(index, int):
            return 400, {"error": "index must be an integer pool index of the open query"}
        if label is not None and not isinstance(label, str):
            return 400, {"error": "label must be a class name (a string) or null"}
        with self.mutex:
            if index not in self.position:
                return 404, {"error": f"index {index} is not in round {self.round}'s query"}
            if label is not None and label not in self.classes and label != SKIP:
                return 400, {"error": f"unknown class {label[:80]!r}; classes: {', '.join(self.classes)}"}
            from alssl.runs import atomic_write_text

            with queries_lock(self.run_dir):
                if not self.is_open():
                    return 409, {"error": f"round {self.round} is no longer open (it was imported); reload the page"}
                labels = self.labels()  # what is on disk now (another tab or server may have written)
                if label is None:
                    labels.pop(index, None)
                else:
                    labels[index] = label
                atomic_write_text(self.partial, partial_csv(labels, self.indices, self.dataset.ids))
            return 200, {"index": index, "label": label, "labeled": len(labels), "total": len(self.indices)}

    def submit(self) -> tuple[int, dict]:
        """POST /api/submit: import the round through `alssl label --from`'s validation, exactly once."""
        from alssl.rounds import import_labels
        from alssl.runs import Run, RunBusy, run_lock

        with self.mutex:
            try:
                with run_lock(self.run_dir, wait=LOCK_WAIT_S):
                    run = Run.open(self.run_dir)  # state re-read under the lock
                    oq = run.open_query
                    if oq is None or int(oq["round"]) != self.round:
                        done = self._already_imported(run)
                        if done is not None:
                            self.result = done
                            return 200, done
                        return 409, {"error": f"round {self.round} is no longer open: another command imported it, "
                                              f"not from this page's labels; see `alssl status {self.run_dir}`"}
                    with queries_lock(self.run_dir):
                        labels = self.labels()
                        missing = [i for i in self.indices if i not in labels]
                        invalid = [i for i in self.indices if i in labels and labels[i] not in self.classes
                                   and labels[i] != SKIP]
                        if missing or invalid:
                            return 409, {"error": f"{len(missing)} image(s) have no label and {len(invalid)} an "
                                                  f"unknown class; label them, then submit again; nothing was imported",
                                         "missing": [{"index": i, "id": self.dataset.ids[i]} for i in missing],
                                         "invalid": [{"index": i, "id": self.dataset.ids[i], "label": labels[i]}
                                                     for i in invalid]}
                        try:
                            n = import_labels(run, self.dataset, self.partial,
                                              classes=self.classes if self.store else None)
                        except UserError as exc:
                            return 409, {"error": str(exc), "missing": [], "invalid": []}
                        self.store = False
                    self.result = self._summary(run, n, already=False)
                    return 200, self.result
            except RunBusy as exc:
                return 503, {"error": f"{exc}; nothing was imported, submit again when it is done"}

    def next_query(self, image_url) -> tuple[int, dict]:
        """POST /api/next: open the next query with this round's strategy, budget, seed and probe."""
        from alssl.rounds import query
        from alssl.runs import Run, RunBusy, run_lock

        with self.mutex:
            try:
                with run_lock(self.run_dir, wait=LOCK_WAIT_S):
                    run = Run.open(self.run_dir)
                    oq = run.open_query
                    if oq is not None and int(oq["round"]) == self.round:
                        return 409, {"error": f"round {self.round} is still open; submit it first"}
                    if oq is None:
                        q = self.query
                        try:
                            query(run, self.dataset, budget=q["budget"], strategy=q["strategy"], seed=q["seed"],
                                  probe=q.get("probe", "linear"))
                        except UserError as exc:
                            return 409, {"error": str(exc)}
                    self.load(run)  # the new open query (or one another process opened meanwhile)
            except RunBusy as exc:
                return 503, {"error": f"{exc}; try again when it is done"}
        return 200, self.payload(image_url)

    def _already_imported(self, run) -> dict | None:
        """The summary of this round if it was imported from its partial file (a second Submit, another tab or
        server); None otherwise (e.g. `alssl label --oracle` closed it)."""
        lr = run.labeled_round
        rec = run.rounds[self.round] if run.n_rounds > self.round else {}
        skipped = set(rec.get("skipped", []))
        if (rec and source_of(rec, run.path) == self.partial.resolve()
                and all(lr[i] == self.round or i in skipped for i in self.indices)):
            return self._summary(run, 0, already=True)
        return None

    def _summary(self, run, n: int, *, already: bool) -> dict:
        rec = run.rounds[self.round]
        return {"round": self.round, "imported": n, "already_imported": already, "round_labels": rec["n"],
                "skipped": len(rec.get("skipped", [])),
                "labeled": int(run.labeled_mask.sum()), "rounds": run.n_rounds, "source": rec.get("source"),
                "next": {"budget": self.query["budget"], "strategy": self.query["strategy"]}}

    # ------------------------------------------------------------ images
    def image(self, index: int) -> tuple[bytes, str] | None:
        """PNG/JPEG bytes of a queried image (None for any other index): an image-folder pool's original file
        downscaled to ≤ 512 px, else the pool pixels."""
        with self.mutex:
            if index not in self.position:
                return None
            hit = self._images.get(index)
            if hit is not None:
                self._images.move_to_end(index)
                return hit
        out = self._original(index) if self.pool_root is not None else None
        if out is None:
            out = png(np.asarray(self.dataset.x_train[index])), "image/png"
        with self.mutex:
            self._images[index] = out
            while len(self._images) > 256:
                self._images.popitem(last=False)
        return out

    def _original(self, index: int) -> tuple[bytes, str] | None:
        rel = self.dataset.ids[index]
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts:  # ids come from the pool's own scan; never leave its root
            return None
        try:
            return downscaled(self.pool_root / rel)
        except Exception:  # noqa: BLE001 - moved or unreadable since the pool was built: show the pool pixels
            return None

