"""Stage 3 rounds with people in the loop: open a query, write its CSV (and a contact sheet), import labels.

A round is: `query` picks B unlabeled samples and writes `queries/round-K.csv` (header `index,id`); the pool
is unchanged until `label` imports a label for every queried row, from a person's CSV or from the dataset's
ground truth (`--oracle`, for simulation). A label file is checked whole before anything is imported.
"""

from __future__ import annotations

import csv
import io
import zlib
from pathlib import Path

import numpy as np

from alssl.acquisition import NEEDS_LABELS, STRATEGIES, AcquisitionContext, select
from alssl.budget import parse_budget
from alssl.data import Dataset
from alssl.errors import UserError, unknown
from alssl.faults import fault_point
from alssl.features import pool_features
from alssl.runs import Run, atomic_write_bytes, atomic_write_text


def strategy_rng(seed: int, round_k: int, strategy: str) -> np.random.Generator:
    """One reproducible stream per (seed, round, strategy); crc32, not hash(), so it is stable across processes."""
    return np.random.default_rng([seed, round_k, zlib.crc32(strategy.encode())])


def query(run: Run, dataset: Dataset, *, budget: str, strategy: str, seed: int, probe: str = "linear",
          thumbnails: bool = False, options: dict | None = None) -> tuple[Path, bool]:
    """Open round K's query (or re-show the open one asked with the same arguments). Returns (csv path, reshown)."""
    ask = {"budget": str(budget), "strategy": strategy, "seed": seed, "probe": probe}
    open_q = run.state["open_query"]
    if open_q is not None:
        if {k: open_q[k] for k in ask} == ask:
            return run.path / open_q["file"], True
        raise UserError(
            f"round {open_q['round']} query ({open_q['file']}) is still open; label it with `alssl label {run.path} "
            "--from FILE.csv` (or --oracle) before asking for a new one"
        )
    if strategy not in STRATEGIES:
        raise unknown("strategy", strategy, STRATEGIES)
    labeled = run.labeled_mask
    n = parse_budget(budget, n_pool=len(labeled), n_unlabeled=int((~labeled).sum()))
    if strategy in NEEDS_LABELS and not labeled.any():
        raise UserError(
            f"strategy {strategy} needs labeled samples to start; label a first round with `alssl query {run.path} "
            f"--budget {budget} --strategy random`"
        )
    train_emb, _ = pool_features(run.path, dataset)
    k = run.n_rounds
    ctx = AcquisitionContext(
        embeddings=train_emb, labeled=labeled, labels=run.labels, num_classes=dataset.num_classes,
        images=dataset.x_train, probe=probe, options=dict(options or {}), cache_dir=run.path / "features",
    )
    picked = np.sort(select(strategy, ctx, n, strategy_rng(seed, k, strategy)))
    rel = f"queries/round-{k}.csv"
    rows = "".join(f"{i},{dataset.ids[i]}\n" for i in picked.tolist())
    atomic_write_text(run.path / rel, "index,id\n" + rows)
    if thumbnails:
        atomic_write_bytes(run.path / f"queries/round-{k}.png", contact_sheet(dataset.x_train, picked))
    fault_point("query-after-csv")
    run.state["open_query"] = {**ask, "round": k, "file": rel, "indices": picked.tolist(), **({"info": ctx.info} if ctx.info else {})}
    run.save_state()
    return run.path / rel, False


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
        raise UserError(f"no open query in {run.path}; ask for one with `alssl query {run.path} --budget 2%`")
    return open_q


def label_oracle(run: Run, dataset: Dataset) -> int:
    """Close the open query with the dataset's ground-truth labels (simulation)."""
    open_q = _require_open(run)
    idx = np.asarray(open_q["indices"], dtype=np.int64)
    return _close(run, idx, dataset.y_train[idx], source="oracle")


def parse_label_csv(text: str, *, dataset: Dataset, open_indices: list[int], labeled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a person's label CSV against the open query; returns (indices, labels) or raises listing bad rows."""
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    if header not in (["index", "label"], ["id", "label"]):
        raise UserError(f"label file must start with a header `index,label` or `id,label` (found {','.join(header) or 'nothing'}); add it")
    key = header[0]
    by_id = {dataset.ids[i]: i for i in open_indices} if key == "id" else {}
    by_name = {c: k for k, c in enumerate(dataset.classes)}
    wanted = set(open_indices)
    problems: list[str] = []
    seen: dict[int, int] = {}
    out_i, out_y = [], []
    for line_no, row in enumerate(reader, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            problems.append(f"line {line_no}: expected 2 columns, got {len(row)}")
            continue
        ref, lab = row[0].strip(), row[1].strip()
        if key == "index":
            if not ref.lstrip("-").isdigit():
                problems.append(f"line {line_no}: index {ref!r} is not an integer")
                continue
            i = int(ref)
            if not 0 <= i < len(labeled):
                problems.append(f"line {line_no}: unknown index {i} (pool has {len(labeled)} samples)")
                continue
        else:
            if ref not in by_id:
                problems.append(f"line {line_no}: unknown id {ref!r} (not in the open query)")
                continue
            i = by_id[ref]
        if labeled[i]:
            problems.append(f"line {line_no}: index {i} is already labeled")
            continue
        if i not in wanted:
            problems.append(f"line {line_no}: index {i} is not in the open query")
            continue
        if i in seen:
            problems.append(f"line {line_no}: duplicate row for index {i} (first on line {seen[i]})")
            continue
        seen[i] = line_no
        if lab in by_name:
            y = by_name[lab]
        elif lab.isdigit() and int(lab) < dataset.num_classes:
            y = int(lab)
        else:
            problems.append(f"line {line_no}: unknown class {lab!r} (classes: {', '.join(dataset.classes[:10])}{', ...' if dataset.num_classes > 10 else ''})")
            continue
        out_i.append(i)
        out_y.append(y)
    missing = sorted(wanted - set(seen))
    if missing and not problems:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        problems.append(f"{len(missing)} queried rows have no label (index {shown})")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserError(f"label file rejected, nothing imported: {'; '.join(problems[:5])}{more}; fix these rows and rerun")
    return np.asarray(out_i, np.int64), np.asarray(out_y, np.int64)


def label_from_csv(run: Run, dataset: Dataset, path: Path) -> int:
    """Import a person's labels for the open query; the whole file is rejected on any bad row."""
    open_q = _require_open(run)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label file {path} does not exist; pass the CSV you filled in (header index,label)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"label file {path} is unreadable ({type(exc).__name__}); save it as UTF-8 CSV") from None
    idx, y = parse_label_csv(text, dataset=dataset, open_indices=open_q["indices"], labeled=run.labeled_mask)
    return _close(run, idx, y, source=str(path))


def _close(run: Run, idx: np.ndarray, y: np.ndarray, *, source: str) -> int:
    open_q = run.state["open_query"]
    run.add_labels(idx, y, round_meta={"strategy": open_q["strategy"], "budget": open_q["budget"], "seed": open_q["seed"], "source": source,
                                       **({"info": open_q["info"]} if open_q.get("info") else {})})
    run.state["open_query"] = None
    run.save_state()
    return len(idx)
