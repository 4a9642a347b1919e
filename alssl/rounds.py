"""Stage 3 rounds with people in the loop: open a query, write its CSV (and a contact sheet), import labels.

A round is: `query` picks B unlabeled samples and writes `queries/round-K.csv` (header `index,id`, CSV-quoted); the
pool is unchanged until `label` imports a label for every queried row, from a person's file or from the dataset's
ground truth (`--oracle`, for simulation). Labels a person already has for any pool images can be imported as a
round of their own (`--any`). A label file is checked whole before anything is imported, every problem listed at once.
A label `__skip__` (SKIP; Label Studio's skipped tasks and the page's skip key mean the same) marks an image as "none
of these": it is recorded as skipped in the round (`rounds[k].skipped` in state.json), never queried again and not
labeled.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zlib
from pathlib import Path

import numpy as np

from alssl.budget import parse_budget
from alssl.data import Dataset
from alssl.errors import UserError, check_seed, suggest, unknown, warn
from alssl.faults import fault_point
from alssl.runs import Run, atomic_write_bytes, atomic_write_text


def strategy_rng(seed: int, round_k: int, strategy: str) -> np.random.Generator:
    """One reproducible stream per (seed, round, strategy); crc32, not hash(), so it is stable across processes."""
    return np.random.default_rng([seed, round_k, zlib.crc32(strategy.encode())])


def query(run: Run, dataset: Dataset, *, budget: str, strategy: str, seed: int, probe: str = "linear",
          thumbnails: bool = False, options: dict | None = None) -> tuple[Path, bool]:
    """Open round K's query (or re-show the open one asked with the same arguments). Returns (csv path, reshown)."""
    from alssl.acquisition import NEEDS_LABELS, STRATEGIES, AcquisitionContext, select  # torch, faiss: query only
    from alssl.feature_sets import choose, pool_features

    check_seed(seed)
    ask = {"budget": str(budget), "strategy": strategy, "seed": seed, "probe": probe}
    open_q = run.state["open_query"]
    if open_q is not None:
        if {k: open_q[k] for k in ask} == ask:
            if not (run.path / open_q["file"]).is_file():  # deleted by hand: the query is in state.json, write it again
                atomic_write_text(run.path / open_q["file"], query_csv(dataset, open_q["indices"]))
            return run.path / open_q["file"], True
        raise UserError(
            f"round {open_q['round']} query ({open_q['file']}) is still open; label it with `alssl label {run.path} "
            "--from FILE.csv` (or --oracle) before asking for a new one"
        )
    if strategy not in STRATEGIES:
        raise unknown("strategy", strategy, STRATEGIES)
    labeled, skipped = run.labeled_mask, run.skipped_mask
    n = parse_budget(budget, n_pool=len(labeled), n_unlabeled=int((~labeled & ~skipped).sum()))
    if strategy in NEEDS_LABELS and not labeled.any():
        raise UserError(
            f"strategy {strategy} needs labeled samples to start; label a first round with `alssl query {run.path} "
            f"--budget {budget} --strategy typiclust` (or random)"
        )
    choice = choose(run, dataset)
    train_emb, _ = pool_features(run.path, dataset, choice.path)
    k = run.n_rounds
    options = dict(options or {})
    if options.get("skip_duplicates") is None:  # on for pools of image files, off for benchmark data (train/<i> ids)
        options["skip_duplicates"] = dataset.ids[0] != "train/0"
    keep = np.flatnonzero(~skipped)  # skipped images are never queried again: the strategy sees the others only
    rows = slice(None) if len(keep) == len(skipped) else keep
    ctx = AcquisitionContext(
        embeddings=train_emb if len(keep) == len(skipped) else _Rows(train_emb, keep),  # memory-mapped, read on demand
        labeled=labeled[rows], labels=run.labels[rows], num_classes=dataset.num_classes,
        images=dataset.x_train if len(keep) == len(skipped) else _Rows(dataset.x_train, keep), probe=probe,
        options=options, cache_dir=run.path / "features",
    )
    picked = np.sort(keep[select(strategy, ctx, n, strategy_rng(seed, k, strategy))])
    rel = f"queries/round-{k}.csv"
    atomic_write_text(run.path / rel, query_csv(dataset, picked.tolist()))
    if thumbnails:
        atomic_write_bytes(run.path / f"queries/round-{k}.png", contact_sheet(dataset.x_train, picked))
    meta = {**ask, "round": k, "file": rel, **choice.record(), **({"info": ctx.info} if ctx.info else {})}
    atomic_write_text(run.path / f"queries/round-{k}.json",  # the query CSV's metadata: what picked it, on which features
                      json.dumps({**meta, "feature_scores": choice.scores}, indent=1) + "\n")
    fault_point("query-after-csv")
    run.state["open_query"] = {**meta, "indices": picked.tolist()}
    run.save_state()
    return run.path / rel, False


class _Rows:
    """Rows `keep` of an image array (or DiskPool, or memory-mapped features), read on demand: the pool without its
    skipped images."""

    def __init__(self, images, keep: np.ndarray):
        self.images, self.keep = images, keep
        self.shape = (len(keep), *images.shape[1:])
        self.ndim, self.dtype = len(self.shape), images.dtype

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, idx) -> np.ndarray:
        return np.asarray(self.images[self.keep[idx]])


def query_csv(dataset: Dataset, indices: list[int]) -> str:
    """The query file: header `index,id`, one row per queried sample, ids CSV-quoted where needed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", "id"])
    w.writerows([i, dataset.ids[i]] for i in indices)
    return buf.getvalue()


def contact_sheet(images: np.ndarray, indices: np.ndarray, *, cols: int = 10) -> bytes:
    """A PNG grid of the queried images, each captioned with its pool index, for a person to label from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(indices) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, indices.tolist()):
        img = images[i]
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(str(i), fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _require_open(run: Run) -> dict:
    open_q = run.state["open_query"]
    if open_q is None:
        rounds = run.state["rounds"]
        done = (f"round {rounds[-1]['round']} is already labeled ({rounds[-1]['n']} labels from "
                f"{rounds[-1]['source']}); " if rounds else "")
        raise UserError(f"no open query in {run.path}: {done}ask for the next one with `alssl query {run.path} --budget "
                        f"2%`, or import labels you already have with `alssl label {run.path} --from FILE.csv --any`")
    return open_q


def label_oracle(run: Run, dataset: Dataset) -> int:
    """Close the open query with the dataset's ground-truth labels (simulation)."""
    if not dataset.has_ground_truth:
        raise UserError(f"{dataset.name} is an unlabeled pool with no ground truth to simulate a labeler; label the "
                        f"query yourself with `alssl label {run.path} --from FILE.csv`")
    open_q = _require_open(run)
    idx = np.asarray(open_q["indices"], dtype=np.int64)
    return _close(run, idx, dataset.y_train[idx], source="oracle")


LABEL_HEADERS = (["index", "label"], ["id", "label"], ["index", "id", "label"])
SKIP = "__skip__"  # the label of an image that fits no class ("none of these"): recorded as skipped, never re-queried
SKIPPED = -1  # parse_label_rows' label for a SKIP row (Run.add_labels records it as skipped)
_INT = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() accepts '³', which int() rejects


def class_id(value: str, classes: list[str]) -> int | str:
    """A label cell -> class id, or the problem with it (a class name, or an integer id 0..K-1)."""
    if value in classes:
        return classes.index(value)
    if re.fullmatch(r"[0-9]{1,18}", value) and int(value) < len(classes):  # (int() refuses > 4300 digits)
        return int(value)
    if not value:
        return f"empty label (write {SKIP} for an image that fits no class)"
    return (f"unknown class {value[:80]!r}{suggest(value[:200], classes)} (classes: "
            f"{', '.join(classes) if len(classes) <= 30 else ', '.join(classes[:30]) + ', ...'})")


def _where(line: int | str) -> str:
    return f"line {line}" if isinstance(line, int) else line  # CSV line number, or e.g. "task 12" (Label Studio)


def parse_label_rows(rows: list[tuple[int | str, str | None, str | None, str]], *, dataset: Dataset, wanted: set[int],
                     labeled: np.ndarray, what: str, problems: list[str] | tuple = (),
                     required: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validate (line or "task N", index or None, id or None, label) rows whole; returns (indices, labels; SKIPPED
    for a SKIP row) or raises listing every problem at once: `problems` already found while reading the file, the
    bad rows, and the `required` indices (an open query's) that no row names. `wanted` = the indices that may be
    labeled."""
    if not dataset.classes:
        raise UserError("this run has no class list yet; give one once with `alssl label RUN --from FILE "
                        "--classes a,b,c` (or --classes @classes.txt), in the order you want the model's outputs")
    by_id = {name: i for i, name in enumerate(dataset.ids)}
    n = len(labeled)
    problems = list(problems)
    seen: dict[int, int | str] = {}
    out_i, out_y = [], []
    for line, index, ident, lab in rows:
        if index is not None:
            if not _INT.fullmatch(index) or len(index) > 19:  # (int() refuses > 4300 digits)
                problems.append(f"{_where(line)}: index {index[:40]!r} is not an integer pool index")
                continue
            i = int(index)
            if not 0 <= i < n:
                problems.append(f"{_where(line)}: unknown index {i} (the pool has {n} images, 0..{n - 1})")
                continue
            if ident is not None and dataset.ids[i] != ident and dataset.ids[i].strip() != ident.strip():
                problems.append(f"{_where(line)}: index {i} is {dataset.ids[i]!r}, not {ident[:80]!r}")
                continue
        else:
            if ident not in by_id and ident.strip() in by_id:
                ident = ident.strip()  # a hand-made file's stray spaces (the exact name wins when both exist)
            if ident not in by_id:
                problems.append(f"{_where(line)}: {ident[:80]!r} is not an image of the pool{suggest(ident, by_id)}")
                continue
            i = by_id[ident]
        if labeled[i]:
            problems.append(f"{_where(line)}: {dataset.ids[i]!r} (index {i}) is already labeled")
            continue
        if i not in wanted:
            problems.append(f"{_where(line)}: {dataset.ids[i]!r} (index {i}) is not in {what}")
            continue
        if i in seen:
            problems.append(f"{_where(line)}: duplicate row for {dataset.ids[i]!r} (first on {_where(seen[i])})")
            continue
        seen[i] = line
        if lab == SKIP:
            out_i.append(i)
            out_y.append(SKIPPED)
            continue
        y = class_id(lab, dataset.classes)
        if isinstance(y, str):
            problems.append(f"{_where(line)}: {y}")
            continue
        out_i.append(i)
        out_y.append(y)
    missing = sorted(set(required) - seen.keys()) if required is not None else []
    if not problems and not out_i and not missing:
        problems.append("the file has no label rows")
    if problems or missing:
        listed = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
        if missing:  # always listed, after the rows: the whole picture in one pass
            shown = ", ".join(repr(dataset.ids[i]) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            listed.append(f"{len(missing)} queried images have no label ({shown}): label every row of the query, or "
                          f"write {SKIP} for an image that fits no class")
        raise UserError(f"label file rejected, nothing imported: {'; '.join(listed)}; fix these and rerun")
    return np.asarray(out_i, np.int64), np.asarray(out_y, np.int64)


def read_label_csv(text: str) -> list[tuple[int, str | None, str | None, str]]:
    """Rows (line, index, id, label) of a label CSV with header index,label | id,label | index,id,label."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if header not in LABEL_HEADERS:
            raise UserError(f"label file must start with a header `index,label`, `id,label` or `index,id,label` (the "
                            f"query CSV with a label column), or be a Label Studio export (found {','.join(header)[:80] or 'nothing'}); "
                            f"add the header")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise UserError(f"label file rejected, nothing imported: line {line_no} has {len(row)} columns, the "
                                f"header has {len(header)}; quote values that contain commas (\"a, b.jpg\")")
            cells = dict(zip(header, row))  # ids exactly as written: a file name may begin or end with a space
            index = cells.get("index")
            rows.append((line_no, None if index is None else index.strip(), cells.get("id"), cells["label"].strip()))
    except csv.Error as exc:
        raise UserError(f"label file is not valid CSV ({exc}); save it as plain UTF-8 CSV") from None
    return rows


def parse_label_csv(text: str, *, dataset: Dataset, open_indices: list[int], labeled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a person's label CSV against the open query; returns (indices, labels) or raises listing bad rows."""
    return check_open_query(read_label_csv(text), dataset=dataset, open_indices=open_indices, labeled=labeled)


def check_open_query(rows: list, *, dataset: Dataset, open_indices: list[int], labeled: np.ndarray,
                     problems: list[str] | tuple = ()) -> tuple[np.ndarray, np.ndarray]:
    """Label rows validated against the open query: every row valid and every queried image labeled (or skipped)."""
    return parse_label_rows(rows, dataset=dataset, wanted=set(open_indices), labeled=labeled, what="the open query",
                            problems=problems, required=list(open_indices))


def read_label_rows(path: Path, *, dataset: Dataset, run: Run) -> tuple[list, list[str], list[str]]:
    """(rows, problems found while reading, notes for after the import) of a label file: a label CSV, or a Label
    Studio export (JSON, JSON-MIN or CSV: `alssl.labeling.studio`)."""
    text = read_label_file(path)
    from alssl.labeling.studio import export_kind, read_export

    kind = export_kind(path, text)
    if kind is None:
        return read_label_csv(text), [], []
    return read_export(text, kind, dataset=dataset, labeled=run.labeled_mask, labels=run.labels)


def read_label_file(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} does not exist; pass the CSV you filled in (header id,label or index,label)")
    try:  # file names that are not UTF-8 come back exactly as the query CSV wrote them (runs.atomic_write_text)
        return path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"label file {path} is unreadable ({type(exc).__name__}); save it as UTF-8 CSV") from None


def label_from_csv(run: Run, dataset: Dataset, path: Path) -> int:
    """Import a person's labels for the open query; the whole file is rejected on any bad row."""
    open_q = _require_open(run)
    rows, problems, notes = read_label_rows(path, dataset=dataset, run=run)
    idx, y = check_open_query(rows, dataset=dataset, open_indices=open_q["indices"], labeled=run.labeled_mask,
                              problems=problems)
    n = _close(run, idx, y, source=label_source(run, path))
    for note in notes:
        warn(note)
    return n


def label_any(run: Run, dataset: Dataset, path: Path) -> int:
    """Import labels a person already has, for any unlabeled pool images, as a round of its own ("import")."""
    open_q = run.state["open_query"]
    if open_q is not None:
        raise UserError(f"round {open_q['round']}'s query ({open_q['file']}) is open; label it first "
                        f"(`alssl label {run.path} --from FILE.csv`), then import other labels with --any")
    labeled = run.labeled_mask
    rows, problems, notes = read_label_rows(path, dataset=dataset, run=run)
    free = ~labeled & ~run.skipped_mask  # a skipped image stays skipped
    idx, y = parse_label_rows(rows, dataset=dataset, wanted=set(np.flatnonzero(free).tolist()), labeled=labeled,
                              what="the pool's unlabeled, not skipped images", problems=problems)
    run.add_labels(idx, y, round_meta={"strategy": "import", "budget": str(len(idx)), "seed": None,
                                       "source": label_source(run, path)})
    run.save_state()
    for note in notes:
        warn(note)
    return int((y != SKIPPED).sum())


def label_source(run: Run, path: Path) -> str:
    """A label file as its round records it: relative to the run when it is inside it (so the run can move), else as
    given (for information)."""
    try:
        return Path(path).resolve().relative_to(run.path.resolve()).as_posix()
    except ValueError:
        return str(path)


def _close(run: Run, idx: np.ndarray, y: np.ndarray, *, source: str) -> int:
    open_q = run.state["open_query"]
    run.add_labels(idx, y, round_meta={"strategy": open_q["strategy"], "budget": open_q["budget"], "seed": open_q["seed"], "source": source,
                                       **({"info": open_q["info"]} if open_q.get("info") else {}),
                                       **({"features": open_q["features"]} if open_q.get("features") else {})})
    run.state["open_query"] = None
    run.save_state()
    return int((y != SKIPPED).sum())
