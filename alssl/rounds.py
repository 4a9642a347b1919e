"""Stage 3 rounds with people in the loop: pick, open a query, write its CSV (and a contact sheet), import labels.

A round is: `query` picks B unlabeled samples (`pick`, the acquisition step `alssl curve` uses too) and writes
`queries/round-K.csv` (header `index,id`, CSV-quoted); the pool is unchanged until labels arrive for every queried
row, from a person's file, the labeling page, a Label Studio export, a Python mapping or the dataset's ground truth
(`--oracle`, for simulation). Labels a person already has for any pool images can be imported as a round of their own
(`--any`). Every one of these becomes rows (`labeling/files.py`) for `close_round`, the one import: the rows are
checked whole before anything is imported, every problem listed at once.
A label `__skip__` (SKIP; Label Studio's skipped tasks and the page's skip key mean the same) marks an image as "none
of these": it is recorded as skipped in the round (`rounds[k].skipped` in state.json), never queried again and not
labeled.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from alssl.budget import parse_budget
from alssl.data import Dataset
from alssl.errors import UserError, check_seed, suggest, unknown, warn
from alssl.faults import fault_point
from alssl.labeling.files import SKIP, Row, read_label_rows, rows_from_mapping
from alssl.runs import Run, atomic_write_bytes, atomic_write_text


def strategy_rng(seed: int, round_k: int, strategy: str) -> np.random.Generator:
    """One reproducible stream per (seed, round, strategy); crc32, not hash(), so it is stable across processes."""
    return np.random.default_rng([seed, round_k, zlib.crc32(strategy.encode())])


def needs_labels_first(strategy: str, labeled: np.ndarray) -> bool:
    """Whether `strategy` is model-based (it needs labels) and nothing is labeled yet: such a strategy cannot start a
    run. `query` refuses it (the person picks a first round with typiclust or random); a curve starts it with random
    (Bengar's protocol: the same first round as random), `pick(start_random=True)`."""
    from alssl.acquisition import NEEDS_LABELS

    return strategy in NEEDS_LABELS and not labeled.any()


def pick(strategy: str, n: int, *, embeddings, labeled: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
         round_k: int, images=None, probe: str = "linear", options: dict | None = None,
         skipped: np.ndarray | None = None, cache_dir: Path | None = None, start_random: bool = False
         ) -> tuple[np.ndarray, dict]:
    """One acquisition step, for `query` and `curve` alike: the `n` pool indices `strategy` picks next (int64, in the
    strategy's order) and what it reports (delta, random_fill, ...). Pure: nothing is written.

    `embeddings` [N, D], `labeled`/`labels`/`skipped` [N] and `images` cover the whole pool; skipped images are never
    picked (the strategy sees the others only). The stream of random numbers is `strategy_rng(seed, round_k, name)`.
    A model-based strategy with nothing labeled yet is refused, or with `start_random` replaced by random."""
    from alssl.acquisition import AcquisitionContext, select  # torch, faiss: acquisition only

    name = "random" if start_random and needs_labels_first(strategy, labeled) else strategy
    keep = np.arange(len(labeled)) if skipped is None else np.flatnonzero(~skipped)
    whole = len(keep) == len(labeled)
    rows = slice(None) if whole else keep
    ctx = AcquisitionContext(
        embeddings=embeddings if whole else _Rows(embeddings, keep),  # memory-mapped, read on demand
        labeled=labeled[rows], labels=labels[rows], num_classes=num_classes,
        images=images if whole or images is None else _Rows(images, keep), probe=probe,
        options=dict(options or {}), cache_dir=cache_dir,
    )
    picked = select(name, ctx, n, strategy_rng(seed, round_k, name))
    return (picked if whole else keep[picked]), ctx.info


def query(run: Run, dataset: Dataset, *, budget: str, strategy: str, seed: int, probe: str = "linear",
          thumbnails: bool = False, options: dict | None = None) -> tuple[Path, bool]:
    """Open round K's query (or re-show the open one asked with the same arguments). Returns (csv path, reshown)."""
    from alssl.acquisition import STRATEGIES  # torch, faiss: query only
    from alssl.feature_sets import choose, pool_features

    check_seed(seed)
    ask = {"budget": str(budget), "strategy": strategy, "seed": seed, "probe": probe}
    open_q = run.open_query
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
    if needs_labels_first(strategy, labeled):
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
    picked, info = pick(strategy, n, embeddings=train_emb, labeled=labeled, labels=run.labels,
                        num_classes=dataset.num_classes, seed=seed, round_k=k, images=dataset.x_train, probe=probe,
                        options=options, skipped=skipped, cache_dir=run.path / "features")
    picked = np.sort(picked)
    rel = f"queries/round-{k}.csv"
    atomic_write_text(run.path / rel, query_csv(dataset, picked.tolist()))
    if thumbnails:
        from alssl.labeling.images import contact_sheet

        atomic_write_bytes(run.path / f"queries/round-{k}.png", contact_sheet(dataset.x_train, picked))
    meta = {**ask, "round": k, "file": rel, **choice.record(), **({"info": info} if info else {})}
    # the query CSV's metadata: what picked it, on which features
    atomic_write_text(run.path / f"queries/round-{k}.json",
                      json.dumps({**meta, "feature_scores": choice.scores}, indent=1) + "\n")
    fault_point("query-after-csv")
    run.open_query = {**meta, "indices": picked.tolist()}
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


# ---------------------------------------------------------------- the open query and the class list
def require_open_query(run: Run, *, then: str | None = None) -> dict:
    """The open query; none is a UserError naming the fix (`then`: the command to rerun once `alssl query` opened
    one; without it, the next query or an import of labels a person already has)."""
    open_q = run.open_query
    if open_q is None and then is not None:
        raise UserError(f"no open query in {run.path}; ask for one with `alssl query {run.path} --budget 2%`, then "
                        f"rerun `{then}`")
    if open_q is None:
        rounds = run.rounds
        done = (f"round {rounds[-1]['round']} is already labeled ({rounds[-1]['n']} labels from "
                f"{rounds[-1]['source']}); " if rounds else "")
        raise UserError(f"no open query in {run.path}: {done}ask for the next one with "
                        f"`alssl query {run.path} --budget 2%`, or import labels you already have with "
                        f"`alssl label {run.path} --from FILE.csv --any`")
    return open_q


def resolve_classes(run: Run, dataset: Dataset, given: list[str] | None) -> tuple[list[str], bool]:
    """(class list to label with, whether it is new to the run) for the labeling page and `alssl tasks`."""
    new = run.classes_are_new(dataset, given)
    if given is None and not dataset.classes:
        raise UserError("this run has no class list yet; give one with --classes a,b,c (or --classes @classes.txt), "
                        "in the order you want the model's outputs")
    return list(given if given is not None else dataset.classes), new


# ---------------------------------------------------------------- labels in: rows -> close_round
SKIPPED = -1  # check_rows' label for a SKIP row (Run.add_labels records it as skipped)
_INT = re.compile(r"-?[0-9]+")  # ASCII digits only: str.isdigit() accepts '³', which int() rejects
ORACLE = "oracle"  # import_labels' name for the dataset's ground truth (simulation)


def class_id(value: str | int, classes: list[str]) -> int | str:
    """A label (a class name, or an integer id 0..K-1, as text in a file) -> class id, or the problem with it."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= value < len(classes):
            return int(value)
        return f"class id {value} is not one of 0..{len(classes) - 1}"
    if not isinstance(value, str):
        return f"label {str(value)[:80]!r} is not a class name or an integer class id"
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


def parse_label_rows(rows: list[Row], *, dataset: Dataset, wanted: set[int], labeled: np.ndarray, what: str,
                     problems: list[str] | tuple = (), required: list[int] | None = None,
                     subject: str = "label file") -> tuple[np.ndarray, np.ndarray]:
    """Validate (where, index or None, id or None, label) rows whole; returns (indices, labels; SKIPPED for a SKIP
    row) or raises listing every problem at once: `problems` already found while reading the file, the bad rows, and
    the `required` indices (an open query's) that no row names. `wanted` = the indices that may be labeled."""
    if not dataset.classes:
        raise UserError("this run has no class list yet; give one once with `alssl label RUN --from FILE "
                        "--classes a,b,c` (or --classes @classes.txt), in the order you want the model's outputs")
    by_id = {name: i for i, name in enumerate(dataset.ids)}
    n = len(labeled)
    problems = list(problems)
    seen: dict[int, int | str] = {}
    out_i, out_y = [], []
    for line, index, ident, lab in rows:
        if isinstance(index, str):
            if not _INT.fullmatch(index) or len(index) > 19:  # (int() refuses > 4300 digits)
                problems.append(f"{_where(line)}: index {index[:40]!r} is not an integer pool index")
                continue
            index = int(index)
        if index is not None:
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
        problems.append("the file has no label rows" if subject == "label file" else f"no {subject}")
    if problems or missing:
        listed = problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else [])
        if missing:  # always listed, after the rows: the whole picture in one pass
            shown = ", ".join(repr(dataset.ids[i]) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            listed.append(f"{len(missing)} queried images have no label ({shown}): label every row of the query, or "
                          f"write {SKIP} for an image that fits no class")
        raise UserError(f"{subject} rejected, nothing imported: {'; '.join(listed)}; fix these and rerun")
    return np.asarray(out_i, np.int64), np.asarray(out_y, np.int64)


def _wanted(run: Run, *, any_images: bool) -> tuple[set[int], str, list[int] | None]:
    """(the indices rows may label, their name in messages, the indices every one of which needs a row): the open
    query's, or with `any_images` (no query may be open then) the pool's unlabeled, not skipped images."""
    if any_images:
        open_q = run.open_query
        if open_q is not None:
            raise UserError(f"round {open_q['round']}'s query ({open_q['file']}) is open; label it first "
                            f"(`alssl label {run.path} --from FILE.csv`), then import other labels with --any")
        free = ~run.labeled_mask & ~run.skipped_mask  # a skipped image stays skipped
        return set(np.flatnonzero(free).tolist()), "the pool's unlabeled, not skipped images", None
    indices = [int(i) for i in require_open_query(run)["indices"]]
    return set(indices), "the open query", indices


def check_rows(run: Run, dataset: Dataset, rows: list[Row], *, any_images: bool = False,
               problems: list[str] | tuple = (), subject: str = "label file") -> tuple[np.ndarray, np.ndarray]:
    """Rows checked whole, nothing written: against the open query (every row valid, every queried image labeled or
    skipped), or with `any_images` against the pool's unlabeled, not skipped images. Returns (indices, labels)."""
    wanted, what, required = _wanted(run, any_images=any_images)
    return parse_label_rows(rows, dataset=dataset, wanted=wanted, labeled=run.labeled_mask, what=what,
                            problems=problems, required=required, subject=subject)


def close_round(run: Run, dataset: Dataset, rows: list[Row], *, source: str, problems: list[str] | tuple = (),
                notes: list[str] | tuple = (), any_images: bool = False, classes: list[str] | None = None,
                subject: str = "label file") -> int:
    """The one way labels enter a run (`alssl label`, the labeling page, Label Studio exports, a Python mapping).

    The rows (`labeling/files.py`) are checked whole (`check_rows`: every problem at once, with the `problems` the
    reader found), then written and the open query closed, or with `any_images` imported as a round of its own;
    state.json is saved once. `classes` gives a run without a class list its classes (stored in state.json and
    run.toml with the import). `notes` are warned after the import. Returns the number of labels imported (skipped
    images not counted)."""
    new_classes = run.classes_are_new(dataset, classes)
    if new_classes:
        run.set_classes(dataset, classes)
    try:
        idx, y = check_rows(run, dataset, rows, any_images=any_images, problems=problems, subject=subject)
    except UserError:
        if new_classes:  # nothing stored by a refused import
            run.set_classes(dataset, None)
        raise
    if any_images:
        meta = {"strategy": "import", "budget": str(len(idx)), "seed": None, "source": source}
    else:
        open_q = run.open_query
        meta = {"strategy": open_q["strategy"], "budget": open_q["budget"], "seed": open_q["seed"], "source": source,
                **({"info": open_q["info"]} if open_q.get("info") else {}),
                **({"features": open_q["features"]} if open_q.get("features") else {})}
    run.add_labels(idx, y, round_meta=meta)
    if not any_images:
        run.open_query = None
    run.save_state()
    if new_classes:
        run.save_config()
    for note in notes:
        warn(note)
    return int((y != SKIPPED).sum())


def check_source(labels, *, any_images: bool) -> None:
    """Refuse a combination no import can take (checked before a run is opened): the oracle labels the open query,
    never "any images"."""
    if any_images and isinstance(labels, str) and labels == ORACLE:
        raise UserError("--any imports labels from a file; use it with --from FILE.csv, not --oracle")


def import_labels(run: Run, dataset: Dataset, labels: Mapping | str | os.PathLike, *, any_images: bool = False,
                  classes: list[str] | None = None) -> int:
    """Labels from anywhere into the run through `close_round`: a mapping {pool index (int) or image id (str): class
    name, class id (int) or SKIP}, a label file (our CSV or a Label Studio export), or the str "oracle" (the dataset's
    ground truth, a simulation; a file named oracle is Path("oracle")). Returns the number of labels imported."""
    check_source(labels, any_images=any_images)
    run.classes_are_new(dataset, classes)  # the order of the answers: class list, then open query, then the rows
    if isinstance(labels, str) and labels == ORACLE:
        if not dataset.has_ground_truth:
            raise UserError(f"{dataset.name} is an unlabeled pool with no ground truth to simulate a labeler; label "
                            f"the query yourself with `alssl label {run.path} --from FILE.csv`")
        idx = [int(i) for i in require_open_query(run)["indices"]]
        rows = [(f"index {i}", i, None, int(dataset.y_train[i])) for i in idx]
        return close_round(run, dataset, rows, source="oracle", classes=classes)
    _wanted(run, any_images=any_images)  # an open query (or, with any_images, none) before the rows are read
    if isinstance(labels, Mapping):
        return close_round(run, dataset, rows_from_mapping(labels), source="python", any_images=any_images,
                           classes=classes, subject="labels")
    rows, problems, notes = read_label_rows(Path(labels), dataset=dataset, labeled=run.labeled_mask, labels=run.labels)
    return close_round(run, dataset, rows, source=label_source(run, labels), problems=problems, notes=notes,
                       any_images=any_images, classes=classes)


def label_source(run: Run, path: Path) -> str:
    """A label file as its round records it: relative to the run when it is inside it (so the run can move), else as
    given (for information)."""
    try:
        return Path(path).resolve().relative_to(run.path.resolve()).as_posix()
    except ValueError:
        return str(path)
