"""Label Studio round trip, the way out: tasks + labeling config for the open query (`alssl tasks`).

The exports come back in through `alssl label --from` (read by `labeling/files.py`, imported by `rounds.close_round`).

Out: one task per queried image, `data.image` a Label Studio local-files URL (`/data/local-files/?d=<path relative
to the document root>`), `data.alssl_index` (the pool index: Label Studio exports task data back, so every export
maps back without guessing), `data.alssl_id`, `data.alssl_round`, and `predictions` (the run's best model: class +
score) when the run has labels and the suggestion is pre-selected as on the page (`session.preselected`: >= 0.8
confident, from a model >= 0.8 accurate); `config.xml` has one `<Choices name="label">` over the run's classes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np

from alssl.errors import UserError
from alssl.labeling.files import FROM_NAME
from alssl.runs import read_json

TO_NAME = "image"
LOCAL_FILES = "/data/local-files/?d="


# ---------------------------------------------------------------- out: tasks and config
def labeling_config(classes: list[str]) -> str:
    """The labeling config: the image, its alssl id as a header, one single choice over the classes."""
    from xml.sax.saxutils import quoteattr

    always_double = {'"': "&quot;"}  # quoteattr would switch to single quotes around a name with a double quote
    choices = "\n".join(f"    <Choice value={quoteattr(c, always_double)}/>" for c in classes)
    return (f'<View>\n  <Header value="$alssl_id"/>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" showInline="true" '
            'required="true">\n'
            f"{choices}\n  </Choices>\n</View>\n")


def local_files_url(rel: str) -> str:
    return LOCAL_FILES + quote(rel.replace(os.sep, "/").encode("utf-8", "surrogateescape"), safe="/")


TASK_FILES = ["tasks.json", "config.xml", "images"]


def is_tasks_dir(out: Path) -> bool:
    """Whether `out` holds earlier `alssl tasks` output (a tasks.json of alssl's tasks)."""
    tasks = read_json(out / "tasks.json")
    return isinstance(tasks, list) and all(isinstance(t, dict) and isinstance(t.get("data"), dict)
                                           and "alssl_index" in t["data"] for t in tasks)


def write_tasks(run, dataset, out: Path, *, classes: list[str], document_root: Path | None = None) -> dict:
    """out/tasks.json + out/config.xml for the open query (and out/images/ for datasets that live in memory)."""
    from alssl.labeling.session import preselected
    from alssl.labeling.images import png
    from alssl.rounds import require_open_query
    from alssl.runs import atomic_write_bytes, atomic_write_text

    open_q = require_open_query(run, then=f"alssl tasks {run.path} --out DIR")
    indices = [int(i) for i in open_q["indices"]]
    cfg = run.data_config
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
    sugg, record = {}, None
    if run.labeled_mask.any():  # (torch only for a run with labels: a model to suggest)
        from alssl.models import model_suggestions

        sugg, record = model_suggestions(run, dataset, indices)
    model = f"alssl: the run's best model after round {run.n_rounds - 1} ({int(run.labeled_mask.sum())} labels)"
    tasks = []
    for i in indices:
        rid = dataset.ids[i]
        if pool_root is not None:
            rel = os.path.relpath(pool_root / rid, root)
        else:
            rel_file = Path("images") / f"{rid}.png"
            atomic_write_bytes(out / rel_file, png(np.asarray(dataset.x_train[i]), min_side=160))
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


def how_to_import(res: dict, run_dir, has_classes: bool) -> str:
    """What to do with `write_tasks`'s files in Label Studio, and how the export comes back (docs/labeling.md)."""
    return ("Label Studio: start it with LOCAL_FILES_SERVING_ENABLED=true "
            f"LOCAL_FILES_DOCUMENT_ROOT={res['document_root']}; "
            f"make a project with the labeling config {res['config']}; add a Local files source storage at "
            f"{res['storage']}; import {res['tasks']}; label; export JSON, JSON-MIN or CSV; then "
            f"`alssl label {run_dir} --from EXPORT`" + ("" if has_classes else " --classes ...")
            + " (docs/labeling.md)")
