"""Feature sets of a run: frozen-backbone embeddings of the pool, cached per checkpoint, and the strongest one chosen
by measurement on the labels.

A run can hold several feature extractors over the same pool (docs/features.md):
- `ssl`: the stage-1 result, `checkpoints/backbone.pt` (named `start` instead when stage 1 ran 0 epochs: then it *is*
  the starting point);
- `start`: the weights stage 1 started from (seeded random init, or the `--init` weights), `checkpoints/start.pt`,
  written when pretraining begins;
- any added with `alssl features RUN --add BACKBONE [--init PATH|hub]`: `checkpoints/features-<name>.pt`, listed in
  `RUN/feature_sets.json` (which also holds a pinned choice, if the user made one).

Embeddings are cached by the sha256 of the checkpoint: `RUN/features/<sha16>.npz` with `train` [N, D] and `test`
[M, D] (M = 0 without a labeled test set). It is a cache: an unreadable or mismatched file is recomputed.

Which set probing, queries, export and the semi fine-tune use (`choose`): the pinned one if the user pinned one; else,
with at least 2 labels per class on average and two classes with 2 or more labels, the best mean accuracy of the
linear probe under stratified k-fold cross-validation on the labeled set (repeated 3 times up to 2,000 labels; the
test set is never used to choose); with fewer labels, the highest RankMe (Garrido et al. 2023, arXiv 2210.02885) —
a label-free proxy. Ties keep the earlier set in the order ssl, added sets, start.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from alssl.backbones import load_backbone_checkpoint
from alssl.data import Dataset, to_tensor
from alssl.errors import UserError, warn
from alssl.runs import Run, atomic_write_bytes, atomic_write_text

REGISTRY = "feature_sets.json"
SSL, START = "ssl", "start"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}")
RANKME_ROWS = 2048  # pool rows RankMe is computed on (evenly spaced): enough for D ≤ 2048, cheap at any N


@torch.no_grad()
def embed(model: nn.Module, x, *, mean, std, batch_size: int = 512, device: str = "cpu") -> np.ndarray:
    """Features [N, D] float32 of uint8 images [N, H, W, C] (an array or a DiskPool) through `model` in eval mode."""
    model = model.eval().to(device)
    out = []
    for i in range(0, len(x), batch_size):
        xb = to_tensor(x[i : i + batch_size], mean, std).to(device)  # [B, C, H, W]
        out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, getattr(model, "dim", 0)), np.float32)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def rankme(features: np.ndarray, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of features [n, D].

    A label-free proxy of representation quality, between 1 (collapsed to a line) and min(n, D); within one method
    higher tends to mean better downstream accuracy. Computed on at most RANKME_ROWS evenly spaced rows."""
    x = np.asarray(features, np.float64)
    if len(x) > RANKME_ROWS:
        x = x[np.linspace(0, len(x) - 1, RANKME_ROWS).astype(np.int64)]
    if len(x) < 2 or not np.isfinite(x).all():
        return float("nan")
    s = np.linalg.svd(x, compute_uv=False)
    if s.sum() <= 0:
        return 1.0
    p = s / s.sum() + eps
    return float(np.exp(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------- the run's feature sets
@dataclass
class FeatureSet:
    name: str
    path: Path  # a backbone checkpoint (alssl/backbones.py backbone_checkpoint)
    origin: str  # what it is, for people


def _registry(run_path: Path) -> dict:
    """RUN/feature_sets.json: {"pinned": NAME | null, "added": {NAME: {"file", "backbone", "init"}}}."""
    path = Path(run_path) / REGISTRY
    if not path.exists():
        return {"pinned": None, "added": {}}
    try:
        reg = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{path} is damaged (not JSON); delete it (the added feature sets are then forgotten) or "
                        f"restore it") from None
    added = reg.get("added") if isinstance(reg, dict) else None
    if not isinstance(added, dict) or not all(isinstance(v, dict) and isinstance(v.get("file"), str)
                                              and NAME_RE.fullmatch(k) for k, v in added.items()) \
            or not (reg.get("pinned") is None or isinstance(reg.get("pinned"), str)):
        raise UserError(f"{path} is damaged (wrong shape); delete it (the added feature sets are then forgotten) or "
                        f"restore it")
    return {"pinned": reg.get("pinned"), "added": added}


def _save_registry(run_path: Path, reg: dict) -> None:
    atomic_write_text(Path(run_path) / REGISTRY, json.dumps(reg, indent=1, sort_keys=True) + "\n")


def feature_sets(run: Run) -> dict[str, FeatureSet]:
    """The run's feature sets by name, in tie-break order: ssl, the added ones (as added), start."""
    ck = run.checkpoints
    out: dict[str, FeatureSet] = {}
    pre = run.state["stages"].get("pretrain", {})
    if (ck / "backbone.pt").exists():
        if pre.get("epochs", 1) == 0:
            out[START] = FeatureSet(START, ck / "backbone.pt", f"stage-1 backbone as it started ({_init_text(run)}, "
                                                                 f"0 epochs)")
        else:
            out[SSL] = FeatureSet(SSL, ck / "backbone.pt", f"stage 1: {pre.get('method', 'ssl')} "
                                                             f"{pre.get('epochs', '?')} epochs")
    for name, entry in _registry(run.path)["added"].items():
        path = run.path / entry["file"]
        if path.exists():
            out[name] = FeatureSet(name, path, f"added: {entry.get('backbone')}"
                                   + (f" from {entry['init']}" if entry.get("init") else " (random init)"))
    if (ck / "start.pt").exists() and START not in out:
        out[START] = FeatureSet(START, ck / "start.pt", f"the weights stage 1 started from ({_init_text(run)})")
    return out


def _init_text(run: Run) -> str:
    init = run.config.get("pretrain", {}).get("init")
    return "random init" if not init else ("hub weights" if init == "hub" else f"--init {Path(init).name}")


def pool_features(run_path: Path, dataset: Dataset, ckpt: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train [N, D], test [M, D]) embeddings of a backbone checkpoint (default: the stage-1 `backbone.pt`),
    computed once per checkpoint."""
    ckpt = Path(ckpt) if ckpt is not None else Path(run_path) / "checkpoints" / "backbone.pt"
    model, _ = load_backbone_checkpoint(ckpt, expect_channels=dataset.channels)
    cache = Path(run_path) / "features" / f"{file_digest(ckpt)}.npz"
    n_test = len(dataset.x_test) if dataset.has_test else 0
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as f:
                train, test = f["train"], f["test"]
            if train.ndim == test.ndim == 2 and (len(train), len(test)) == (dataset.n_pool, n_test):
                return train, test
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            pass
        warn(f"the feature cache {cache} is unreadable or does not match the data; recomputing it")
    torch.manual_seed(0)
    train = embed(model, dataset.x_train, mean=dataset.mean, std=dataset.std)
    test = (embed(model, dataset.x_test, mean=dataset.mean, std=dataset.std) if n_test
            else np.zeros((0, train.shape[1]), np.float32))
    buf = io.BytesIO()
    np.savez(buf, train=train, test=test)
    atomic_write_bytes(cache, buf.getvalue())
    return train, test


# ---------------------------------------------------------------- choosing by measurement
@dataclass
class Choice:
    """Which feature set a command uses, and why; `scores` holds every set's numbers (JSON-ready)."""

    name: str
    why: str
    path: Path
    scores: dict = field(default_factory=dict)  # name -> {"cv_accuracy", "rankme", "test_accuracy"?, "origin"}

    def line(self) -> str:
        """`features (test accuracy): ssl 0.280 · start 0.305 (in use: start)`: test accuracy where the run has a test
        set, else the cross-validated accuracy on the labels, else RankMe."""
        on_test = all("test_accuracy" in s for s in self.scores.values())
        key, what = ("test_accuracy", "test accuracy") if on_test else ("cv_accuracy", "cross-validated accuracy")
        parts = []
        for name, s in self.scores.items():
            v = s.get(key)
            parts.append(f"{name} {v:.3f}" if v is not None else f"{name} RankMe {s['rankme']:.1f}")
        return f"features ({what}): {' · '.join(parts)} (in use: {self.name})"

    def record(self) -> dict:
        return {"features": self.name, "features_why": self.why}


def cv_choice_accuracy(x: np.ndarray, y: np.ndarray, *, num_classes: int, seed: int = 0) -> float | None:
    """Mean accuracy of the linear probe under stratified k-fold CV on the labels (what `choose` compares).

    Classes with a single label sit out (no fold could hold them out); k = min(5, smallest remaining class count);
    repeated 3 times with reshuffled folds up to 2,000 labels (40 labels make a noisy single split). None below about
    2 labels per class (fewer than 2·present classes labels, or fewer than two classes with 2+ labels)."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    from alssl.probes import fit_probe

    y = np.asarray(y).astype(np.int64)
    counts = np.bincount(y, minlength=num_classes)
    keep_classes = np.flatnonzero(counts >= 2)
    if len(y) < 2 * np.count_nonzero(counts) or len(keep_classes) < 2:
        return None
    keep = np.isin(y, keep_classes)
    x, y = x[keep], y[keep]
    k = int(min(5, counts[keep_classes].min()))
    repeats = 3 if len(y) <= 2000 else 1
    correct = total = 0
    for tr, te in RepeatedStratifiedKFold(n_splits=k, n_repeats=repeats, random_state=seed).split(x, y):
        model = fit_probe("linear", x[tr], y[tr], num_classes=num_classes, seed=seed)
        correct += int((model.predict(x[te]) == y[te]).sum())
        total += len(te)
    return correct / total


def _measured(cache: Path, key: str, train: np.ndarray, idx: np.ndarray, y: np.ndarray, num_classes: int,
              seed: int) -> dict:
    """{"rankme", "cv_accuracy"} of one feature set on these labels, cached beside its embeddings (a small JSON keyed
    by the labeled set: every command on the same labels measures once)."""
    try:
        saved = json.loads(cache.read_text())
        got = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(got, dict) and set(got) == {"rankme", "cv_accuracy"}:
            return got
    except (OSError, ValueError, UnicodeDecodeError):
        saved = {}
    cv = cv_choice_accuracy(train[idx], y, num_classes=num_classes, seed=seed) if len(idx) else None
    got = {"rankme": round(rankme(train), 2), "cv_accuracy": None if cv is None else round(cv, 4)}
    keep = {k: v for k, v in (saved if isinstance(saved, dict) else {}).items()}
    keep = dict(list(keep.items())[-31:])  # the last 32 labeled sets
    atomic_write_text(cache, json.dumps({**keep, key: got}))
    return got


def choose(run: Run, dataset: Dataset, *, test_probe: str | None = None, kernel: str = "linear",
           seed: int = 0) -> Choice:
    """The feature set to use on this run's labels (module doc), with every set's scores.

    `test_probe` ("linear" | "svm"): also report each set's test accuracy with that probe (reporting only: the test set
    never takes part in the choice)."""
    from alssl.probes import fit_probe

    sets = feature_sets(run)
    if not sets:
        raise UserError(f"{run.path} has no stage-1 backbone; run `alssl pretrain` first")
    idx = run.labeled_indices
    y = run.labels[idx]
    scores: dict[str, dict] = {}
    labels_key = hashlib.sha256(np.stack([idx, y]).astype(np.int64).tobytes() + str(seed).encode()).hexdigest()[:16]
    for name, fs in sets.items():
        train, test = pool_features(run.path, dataset, fs.path)
        s: dict = {"origin": fs.origin, **_measured(run.path / "features" / f"{file_digest(fs.path)}.scores.json",
                                                    labels_key, train, idx, y, dataset.num_classes, seed)}
        if len(idx):
            if test_probe is not None and dataset.has_test:
                model = fit_probe(test_probe, train[idx], y, num_classes=dataset.num_classes, kernel=kernel, seed=seed)
                s["test_accuracy"] = round(float(model.accuracy(test, dataset.y_test)), 4)
        scores[name] = s
    pinned = _registry(run.path)["pinned"]
    if pinned is not None and pinned in sets:
        return Choice(pinned, f"pinned by the user (`alssl features {run.path} --use {pinned}`)", sets[pinned].path,
                      scores)
    if pinned is not None:
        warn(f"the pinned feature set {pinned!r} is gone from {run.path}; choosing by measurement instead")
    if len(sets) == 1:
        name = next(iter(sets))
        return Choice(name, "the only feature set this run holds", sets[name].path, scores)
    if all(s["cv_accuracy"] is not None for s in scores.values()):
        name = max(scores, key=lambda n: scores[n]["cv_accuracy"])  # max keeps the first of equals
        others = ", ".join(f"{n} {s['cv_accuracy']:.3f}" for n, s in scores.items() if n != name)
        why = (f"best linear-probe cross-validated accuracy on the {len(idx)} labels: {scores[name]['cv_accuracy']:.3f}"
               f" (vs {others})")
        return Choice(name, why, sets[name].path, scores)
    ranked = {n: (s["rankme"] if np.isfinite(s["rankme"]) else -1.0) for n, s in scores.items()}
    name = max(ranked, key=ranked.get)
    others = ", ".join(f"{n} {r:.1f}" for n, r in ranked.items() if n != name)
    why = (f"too few labels to cross-validate ({len(idx)}; need about 2 per class): highest RankMe, a label-free "
           f"proxy: {ranked[name]:.1f} (vs {others})")
    return Choice(name, why, sets[name].path, scores)


# ---------------------------------------------------------------- adding and pinning
def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (SSL, START, "auto"):
        raise UserError(f"feature set name {name!r} is not allowed; use letters, digits and . _ : + - (up to 64 "
                        f"characters), not ssl, start or auto")
    return name


def default_name(backbone: str, init: str | None) -> str:
    """`timm:resnet50` (random init or hub weights are told apart by the record), or `cnn+stage1_backbone` for a file."""
    if init is None or init == "hub":
        return backbone if init == "hub" else f"{backbone}+random"
    return f"{backbone}+{re.sub(r'[^A-Za-z0-9._-]', '_', Path(init).stem)[:40]}"


def add_feature_set(run: Run, dataset: Dataset, *, backbone: str, init: str | None, name: str) -> FeatureSet:
    """Build `backbone` (from `init`), check it takes the pool's images, save it as a backbone checkpoint and
    register it under `name`; the caller holds the run lock."""
    from alssl.backbones import backbone_checkpoint, build_backbone, check_input_size, load_init_weights
    from alssl.runs import atomic_torch_save

    check_name(name)
    reg = _registry(run.path)
    if name in reg["added"]:
        raise UserError(f"{run.path} already has a feature set named {name!r}; pick another --name")
    torch.manual_seed(0)
    model = build_backbone(backbone, dataset.channels)
    if init is not None:
        load_init_weights(model, backbone, init)
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()):
        raise UserError(f"--init {init} holds NaN or infinite weights; give finite weights")
    check_input_size(model, backbone, dataset.channels, dataset.image_size)
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    rel = f"checkpoints/features-{slug}.pt"
    if any(e["file"] == rel for e in reg["added"].values()):
        rel = f"checkpoints/features-{slug}-{len(reg['added'])}.pt"
    atomic_torch_save(backbone_checkpoint(model, name=backbone, in_channels=dataset.channels, feature_set=name,
                                          init=init), run.path / rel)
    reg["added"][name] = {"file": rel, "backbone": backbone, "init": init}
    _save_registry(run.path, reg)
    return feature_sets(run)[name]


def pin(run: Run, name: str) -> None:
    """Use feature set `name` everywhere (`auto`: choose by measurement again)."""
    reg = _registry(run.path)
    if name == "auto":
        reg["pinned"] = None
    else:
        sets = feature_sets(run)
        if name not in sets:
            from alssl.errors import unknown

            raise unknown("feature set", name, list(sets) + ["auto"])
        reg["pinned"] = name
    _save_registry(run.path, reg)
