"""Label files read into rows: our label CSV and Label Studio's exports (JSON, JSON-MIN, CSV); a Python mapping too.

Every way of labeling produces the same rows, `(where, index, id, label)`: `where` says where the row came from for
error messages (a CSV line number, "task 12" of a Label Studio export, "labels[5]" of a mapping), `index` the pool
index (an int, or the text of a file's cell; None when the row names an image by id), `id` the image id (None when
absent) and `label` a class name, an integer class id, or SKIP. Nothing here checks rows against a run: that is
`rounds.close_round`, the one door labels enter a run through (it lists every problem at once, including the
`problems` a reader found, and warns the `notes` after the import).

Label Studio exports (`alssl tasks` writes the tasks, `labeling/studio.py`): each task maps back by
`data.alssl_index`, else by its image path; its label is the choice of its latest (updated_at) annotation that was not
cancelled; a task whose every annotation was cancelled (Label Studio's *Skip*) is "none of these" (SKIP). JSON-MIN and
CSV exports leave cancelled annotations out, so there a skip shows only through a `cancelled_annotations` count. Tasks
of images that earlier rounds already imported (a project reused across rounds) are left out with a note.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np

from alssl.errors import UserError

SKIP = "__skip__"  # the label of an image that fits no class ("none of these"): recorded as skipped, never re-queried
LABEL_HEADERS = (["index", "label"], ["id", "label"], ["index", "id", "label"])
FROM_NAME = "label"  # the <Choices name> of the labeling config `alssl tasks` writes
Row = tuple  # (where: int | str, index: int | str | None, id: str | None, label: str | int)
# columns of Label Studio's JSON-MIN / CSV exports that are not task data
META = {"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "drafts", "predictions", "meta",
        "total_annotations", "cancelled_annotations", "total_predictions", "inner_id", "file_upload", "project",
        "updated_by", "agreement", "comment_count", "unresolved_comment_count", "last_comment_updated_at"}


def read_label_rows(path: Path, *, dataset, labeled: np.ndarray, labels: np.ndarray | None = None
                    ) -> tuple[list[Row], list[str], list[str]]:
    """(rows, problems found while reading, notes for after the import) of a label file: a label CSV, or a Label
    Studio export (JSON, JSON-MIN or CSV). `labeled`/`labels`: the run's, to leave out tasks imported before."""
    text = read_label_file(path)
    kind = export_kind(path, text)
    if kind is None:
        return read_label_csv(text), [], []
    return read_export(text, kind, dataset=dataset, labeled=labeled, labels=labels)


def read_label_file(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} does not exist; "
                        "pass the CSV you filled in (header id,label or index,label)")
    try:  # file names that are not UTF-8 come back exactly as the query CSV wrote them (runs.atomic_write_text)
        return path.read_text(encoding="utf-8-sig", errors="surrogateescape")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"label file {path} is unreadable ({type(exc).__name__}); save it as UTF-8 CSV") from None


def read_label_csv(text: str) -> list[Row]:
    """Rows (line, index, id, label) of a label CSV with header index,label | id,label | index,id,label."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if header not in LABEL_HEADERS:
            raise UserError(f"label file must start with a header `index,label`, `id,label` or `index,id,label` (the "
                            f"query CSV with a label column), or be a Label Studio export "
                            f"(found {','.join(header)[:80] or 'nothing'}); "
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


def rows_from_mapping(mapping: Mapping) -> list[Row]:
    """Rows of a Python mapping {pool index (int) or image id (str): class name, class id (int) or SKIP}."""
    rows = []
    for key, label in mapping.items():
        where = f"labels[{key!r}]"[:100]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            rows.append((where, int(key), None, label))
        elif isinstance(key, str):
            rows.append((where, None, key, label))
        else:  # close_round reports it: "index '...' is not an integer pool index"
            rows.append((where, repr(key), None, label))
    return rows


# ---------------------------------------------------------------- Label Studio exports
def export_kind(path: Path, text: str) -> str | None:
    """'json' for a Label Studio JSON / JSON-MIN export, 'csv' for its CSV export, None for a plain label CSV."""
    head = text.lstrip()[:1]
    if Path(path).suffix.lower() == ".json" or head in ("[", "{"):
        return "json"
    try:
        first = next(csv.reader(io.StringIO(text.splitlines()[0] if text.strip() else "")), [])
    except csv.Error:  # e.g. a first line over csv's field limit: not an export; the label CSV reader says why
        return None
    cols = {c.strip() for c in first}
    if "alssl_index" in cols or ({"annotation_id", "annotator"} <= cols):
        return "csv"
    return None


def read_export(text: str, kind: str, *, dataset, labeled: np.ndarray, labels: np.ndarray | None = None
                ) -> tuple[list, list[str], list[str]]:
    """(rows, problems, notes) of a Label Studio export (`kind`: 'json' for JSON and JSON-MIN, 'csv')."""
    if kind == "json":
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than any export
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:120]
            raise UserError(f"label file is not valid JSON ({reason}); export it again from Label Studio (JSON, "
                            f"JSON-MIN or CSV)") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
            raise UserError("label file is JSON but not a Label Studio export (a list of tasks); export the project "
                            "from Label Studio as JSON, JSON-MIN or CSV")
        full = any(isinstance(t.get("annotations"), list) and isinstance(t.get("data"), dict) for t in data)
        tasks = [_full_task(t, n) for n, t in enumerate(data, 1)] if full else _min_tasks(data)
    else:
        try:
            records = list(csv.DictReader(io.StringIO(text)))
        except csv.Error as exc:
            raise UserError(f"label file is not valid CSV ({exc}); export it again from Label Studio") from None
        tasks = _min_tasks(records, csv_lines=True)
    return _rows(tasks, dataset=dataset, labeled=labeled, labels=labels)


def _full_task(t: dict, n: int) -> dict:
    """One task of the JSON export: its data and the choice of its latest non-cancelled annotation."""
    where = f"task {str(t.get('id', f'#{n}'))[:40]}"
    if not isinstance(t.get("data"), dict):
        return {"where": where, "data": {}, "label": None,
                "problem": "its data is not an object (not a Label Studio task)"}
    anns = [a for a in _list(t.get("annotations")) if isinstance(a, dict)]
    live = [a for a in anns if not a.get("was_cancelled")]
    if not live:
        if anns:  # skipped in Label Studio: "none of these"
            return {"where": where, "data": t.get("data") or {}, "label": SKIP}
        return {"where": where, "data": t.get("data") or {}, "label": None, "problem": "no annotation"}
    latest = max(live, key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), _num(a.get("id"))))
    choices = [r for r in _list(latest.get("result")) if isinstance(r, dict) and isinstance(r.get("value"), dict)
               and "choices" in r["value"]]
    mine = [r for r in choices if r.get("from_name") == FROM_NAME] or choices
    if not mine:
        return {"where": where, "data": t.get("data") or {}, "label": None,
                "problem": f"its latest annotation (id {latest.get('id')}) chose no class"}
    return {"where": where, "data": t.get("data") or {}, "label": _one_choice(mine[0]["value"]["choices"])}


def _min_tasks(records: list[dict], *, csv_lines: bool = False) -> list[dict]:
    """Tasks of a JSON-MIN or CSV export (one record per annotation; tasks without one appear once, unlabeled)."""
    if records and not any(FROM_NAME in r for r in records):
        raise UserError(f"label file has no '{FROM_NAME}' {'column' if csv_lines else 'field'}: it is not an export of "
                        f"tasks labeled with the config `alssl tasks` wrote (<Choices name=\"{FROM_NAME}\">); "
                        f"export that project as JSON, JSON-MIN or CSV")
    by_task: dict[str, list[tuple[int, dict]]] = {}
    for n, r in enumerate(records, 2 if csv_lines else 1):
        key = str(r.get("id", "")).strip() or f"#{n}"
        by_task.setdefault(key, []).append((n, r))
    tasks = []
    for key, group in by_task.items():
        where = f"task {key}" if not key.startswith("#") else (f"line {key[1:]}" if csv_lines else f"record {key[1:]}")
        data = {k: v for k, v in group[0][1].items() if k not in META and k != FROM_NAME}
        labeled = [(n, r) for n, r in group if _present(r.get(FROM_NAME))]
        if not labeled:
            if any(_num(r.get("cancelled_annotations")) > 0 for _, r in group):  # skipped in Label Studio
                tasks.append({"where": where, "data": data, "label": SKIP})
            else:
                tasks.append({"where": where, "data": data, "label": None,
                              "problem": "no annotation (or only cancelled ones: to import skipped tasks, export the "
                                         "project as JSON, which keeps them)"})
            continue
        _, latest = max(labeled, key=lambda nr: (str(nr[1].get("updated_at") or nr[1].get("created_at") or ""),
                                                 _num(nr[1].get("annotation_id")), nr[0]))
        tasks.append({"where": where, "data": data, "label": _one_choice(latest[FROM_NAME])})
    return tasks


def _list(v) -> list:
    """A field that must be a list (annotations, result); anything else counts as empty."""
    return v if isinstance(v, list) else []


def _present(v) -> bool:
    return v not in (None, "", [], {})


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):
        return -1.0


def _one_choice(value) -> str | list:
    """A choice as exported: "cat", ["cat"], {"choices": ["cat"]} or (CSV) '{"choices": ["cat"]}' -> "cat"."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, dict):
        value = value.get("choices", [])
    if isinstance(value, list):
        return str(value[0]).strip() if len(value) == 1 else [str(v) for v in value]
    return str(value).strip()


def _image_index(url, dataset, by_id: dict[str, int]) -> int | None:
    """The pool index of a task's image URL (local-files `?d=`, `/data/upload/...`, a plain path), by its path:
    the id itself, or a path that ends with `/<id>` (with or without the `.png` alssl adds for in-memory pools)."""
    if not isinstance(url, str) or not url:
        return None
    parsed = urlparse(url)
    path = unquote(parse_qs(parsed.query).get("d", [parsed.path])[0]).replace("\\", "/").lstrip("/")
    candidates = [path] + ([path[: -len(".png")]] if path.endswith(".png") else [])
    for c in candidates:
        if c in by_id:
            return by_id[c]
    for c in candidates:  # the longest pool id the path ends with
        parts = c.split("/")
        for k in range(1, len(parts)):
            tail = "/".join(parts[k:])
            if tail in by_id:
                return by_id[tail]
    return None


def _rows(tasks: list[dict], *, dataset, labeled: np.ndarray, labels: np.ndarray | None
          ) -> tuple[list[Row], list[str], list[str]]:
    rows, problems = [], []
    skipped = changed = 0
    by_id = None
    for t in tasks:
        data, where = t["data"], t["where"]
        raw = data.get("alssl_index")
        index = ident = None
        if _present(raw):
            index = str(raw).strip()
            where += f" (alssl_index {index})"
            ident = str(data["alssl_id"]) if _present(data.get("alssl_id")) else None
        else:
            if by_id is None:
                by_id = {name: i for i, name in enumerate(dataset.ids)}
            found = _image_index(data.get("image"), dataset, by_id)
            if found is None:
                shown = str(data.get("image", ""))[:100] or "none"
                problems.append(f"{where}: no data.alssl_index and its image ({shown}) is not an image of the pool")
                continue
            index = str(found)
        if re.fullmatch(r"[0-9]{1,18}", index) and int(index) < len(labeled) and labeled[int(index)]:
            skipped += 1  # imported by an earlier round (a Label Studio project reused across rounds)
            if labels is not None and isinstance(t["label"], str) and 0 <= labels[int(index)] < len(dataset.classes):
                changed += t["label"] != dataset.classes[labels[int(index)]]
            continue
        if t.get("problem"):
            problems.append(f"{where}: {t['problem']}")
            continue
        if isinstance(t["label"], list):
            problems.append(f"{where}: {len(t['label'])} classes chosen ({', '.join(t['label'])[:80]}); choose one")
            continue
        rows.append((where, index, ident, t["label"]))
    notes = []
    if skipped:
        notes.append(f"skipped {skipped} Label Studio task(s) of images that earlier rounds already imported"
                     + (f" ({changed} with a different label there now: alssl keeps the imported one)"
                        if changed else ""))
    return rows, problems, notes

