"""Label Studio round trip: tasks + labeling config out (`alssl tasks`), exports back in (`alssl label --from`).

Out: one task per queried image, `data.image` a Label Studio local-files URL (`/data/local-files/?d=<path relative
to the document root>`), `data.alssl_index` (the pool index: Label Studio exports task data back, so every export
maps back without guessing), `data.alssl_id`, `data.alssl_round`, and `predictions` (the run's best model: class +
score) when the run has labels and the suggestion is pre-selected as on the page (`session.preselected`: >= 0.8
confident, from a model >= 0.8 accurate); `config.xml` has one
`<Choices name="label">` over the run's classes.

In: Label Studio's JSON export (tasks with `annotations`), JSON-MIN (one flat record per annotation) and CSV (the same
columns). Each task maps back by `data.alssl_index`, else by its image path; its label is the choice of its latest
(updated_at) annotation that was not cancelled; a task whose every annotation was cancelled (Label Studio's *Skip*)
is "none of these" (`rounds.SKIP`: recorded as skipped in the round). JSON-MIN and CSV exports leave cancelled
annotations out, so there a skip shows only through a `cancelled_annotations` count. The rows then go through the same whole-file validation as
a label CSV (`rounds.parse_label_rows`), so an unknown class, a task outside the open query or a duplicate task
rejects the file, listing the offending tasks, and nothing is imported. Tasks of images that earlier rounds already
imported (a project reused across rounds) are skipped with a warning.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

import numpy as np

from alssl.errors import UserError
from alssl.rounds import SKIP

FROM_NAME, TO_NAME = "label", "image"
LOCAL_FILES = "/data/local-files/?d="
# columns of Label Studio's JSON-MIN / CSV exports that are not task data
META = {"id", "annotator", "annotation_id", "created_at", "updated_at", "lead_time", "drafts", "predictions", "meta",
        "total_annotations", "cancelled_annotations", "total_predictions", "inner_id", "file_upload", "project",
        "updated_by", "agreement", "comment_count", "unresolved_comment_count", "last_comment_updated_at"}


# ---------------------------------------------------------------- out: tasks and config
def labeling_config(classes: list[str]) -> str:
    """The labeling config: the image, its alssl id as a header, one single choice over the classes."""
    from xml.sax.saxutils import quoteattr

    always_double = {'"': "&quot;"}  # quoteattr would switch to single quotes around a name with a double quote
    choices = "\n".join(f"    <Choice value={quoteattr(c, always_double)}/>" for c in classes)
    return (f'<View>\n  <Header value="$alssl_id"/>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" showInline="true" required="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def local_files_url(rel: str) -> str:
    return LOCAL_FILES + quote(rel.replace(os.sep, "/").encode("utf-8", "surrogateescape"), safe="/")


TASK_FILES = ["tasks.json", "config.xml", "images"]


def is_tasks_dir(out: Path) -> bool:
    """Whether `out` holds earlier `alssl tasks` output (a tasks.json of alssl's tasks)."""
    try:
        tasks = json.loads((out / "tasks.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(tasks, list) and all(isinstance(t, dict) and isinstance(t.get("data"), dict)
                                           and "alssl_index" in t["data"] for t in tasks)


def write_tasks(run, dataset, out: Path, *, classes: list[str], document_root: Path | None = None) -> dict:
    """out/tasks.json + out/config.xml for the open query (and out/images/ for datasets that live in memory)."""
    from alssl.labeling.session import model_suggestions, preselected
    from alssl.runs import atomic_write_bytes, atomic_write_text

    open_q = run.state["open_query"]
    if open_q is None:
        raise UserError(f"no open query in {run.path}; ask for one with `alssl query {run.path} --budget 2%`, then "
                        f"rerun `alssl tasks {run.path} --out DIR`")
    indices = [int(i) for i in open_q["indices"]]
    cfg = run.config["data"]
    pool_root = Path(cfg["spec"]).resolve() if cfg.get("pool") and Path(cfg["spec"]).is_dir() else None  # else PNGs
    out = out.resolve()
    # Label Studio serves files only below LOCAL_FILES_DOCUMENT_ROOT, from a "Local files" storage whose path must be
    # a subfolder of it (not the root itself): the storage is the pool folder (or --out/images), the root above it
    storage = pool_root if pool_root is not None else out / "images"
    root = storage.parent if document_root is None else document_root.expanduser().resolve()
    if root not in storage.parents:
        where = "the pool folder" if pool_root is not None else "--out"
        raise UserError(f"--document-root {root} must be a folder above {where} ({storage}): Label Studio serves "
                        f"files only from a storage below its LOCAL_FILES_DOCUMENT_ROOT; give a parent folder, or "
                        f"leave --document-root out")
    sugg, record = model_suggestions(run, dataset, indices) if run.labeled_mask.any() else ({}, None)
    model = f"alssl: the run's best model after round {run.n_rounds - 1} ({int(run.labeled_mask.sum())} labels)"
    tasks = []
    for i in indices:
        rid = dataset.ids[i]
        if pool_root is not None:
            rel = os.path.relpath(pool_root / rid, root)
        else:
            rel_file = Path("images") / f"{rid}.png"
            atomic_write_bytes(out / rel_file, _upscaled_png(np.asarray(dataset.x_train[i])))
            rel = os.path.relpath(out / rel_file, root)
        task: dict = {"data": {"image": local_files_url(rel), "alssl_index": i, "alssl_id": rid,
                               "alssl_round": int(open_q["round"])}}
        if i in sugg and preselected(sugg[i][1], record):  # a weak guess pre-filled in Label Studio anchors the labeler
            name, score = sugg[i]
            task["predictions"] = [{"model_version": model, "score": score,
                                    "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                                                "value": {"choices": [name]}}]}]
        tasks.append(task)
    text = json.dumps(tasks, indent=1, ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a file name that is not UTF-8: \udcXX escapes keep tasks.json valid UTF-8
            text = json.dumps(tasks, indent=1)
    atomic_write_text(out / "tasks.json", text + "\n")
    atomic_write_text(out / "config.xml", labeling_config(classes))
    return {"tasks": str(out / "tasks.json"), "config": str(out / "config.xml"), "n": len(tasks),
            "round": int(open_q["round"]), "document_root": str(root), "storage": str(storage),
            "predictions": sum("predictions" in t for t in tasks)}


def _upscaled_png(a: np.ndarray, *, min_side: int = 160) -> bytes:
    """Pool pixels as a PNG, nearest-neighbour upscaled so tiny images stay legible in Label Studio."""
    from PIL import Image

    im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    k = max(1, math.ceil(min_side / max(1, min(im.size))))
    if k > 1:
        im = im.resize((im.size[0] * k, im.size[1] * k), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- in: exports
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
    """(rows (where, index, id, label) for `rounds.parse_label_rows`, problems, notes) of a Label Studio export."""
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
        return {"where": where, "data": {}, "label": None, "problem": "its data is not an object (not a Label Studio task)"}
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


def _rows(tasks: list[dict], *, dataset, labeled: np.ndarray, labels: np.ndarray | None) -> tuple[list, list[str], list[str]]:
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
                     + (f" ({changed} with a different label there now: alssl keeps the imported one)" if changed else ""))
    return rows, problems, notes

